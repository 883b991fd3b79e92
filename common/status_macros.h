// Status propagation macros used at every fallible boundary (HOUSE_STYLE.md H7).
#ifndef KLS_COMMON_STATUS_MACROS_H_
#define KLS_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KLS_STATUS_CONCAT_INNER_(a, b) a##b
#define KLS_STATUS_CONCAT_(a, b) KLS_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if not OK.
#define KLS_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status kls_status_ = (expr);       \
    if (!kls_status_.ok()) return kls_status_; \
  } while (false)

// `KLS_ASSIGN_OR_RETURN(auto x, MakeX());` — evaluates a StatusOr, returns its status on error,
// otherwise moves the value into `lhs` (which may be a declaration).
#define KLS_ASSIGN_OR_RETURN(lhs, rexpr) \
  KLS_ASSIGN_OR_RETURN_IMPL_(KLS_STATUS_CONCAT_(kls_statusor_, __LINE__), lhs, rexpr)

#define KLS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)   \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // KLS_COMMON_STATUS_MACROS_H_
