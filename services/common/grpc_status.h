// The one place absl status codes meet gRPC status codes (HOUSE_STYLE.md H9). The mapping is
// 1:1 (both follow google.rpc.Code), so a status crosses any number of hops unchanged.
#ifndef KLS_SERVICES_COMMON_GRPC_STATUS_H_
#define KLS_SERVICES_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kls::services {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace kls::services

#endif  // KLS_SERVICES_COMMON_GRPC_STATUS_H_
