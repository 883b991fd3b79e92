// Minimal leveled logging to stderr (Abseil 20220623 has no absl/log).
//
//   KLS_LOG(INFO) << "loaded " << n << " tensors";
//   KLS_CHECK(ptr != nullptr) << "why";   // programming errors only; never on a request path
//
// Thread-safe: each message is formatted privately and written with one write(2) call.
#ifndef KLS_COMMON_LOGGING_H_
#define KLS_COMMON_LOGGING_H_

#include <sstream>

namespace kls {

enum class LogSeverity { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

// Messages below this level are dropped. Defaults to kInfo, or the KLS_LOG_LEVEL environment
// variable (debug, info, warning, error) when set.
void SetMinLogSeverity(LogSeverity severity);
LogSeverity MinLogSeverity();

namespace internal {

class LogMessage {
 public:
  LogMessage(LogSeverity severity, const char* file, int line);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  // Writes the message; a kFatal message then aborts the process.
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogSeverity severity_;
  std::ostringstream stream_;
};

// Swallows the stream in disabled log statements.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace kls

#define KLS_LOG_SEVERITY_DEBUG ::kls::LogSeverity::kDebug
#define KLS_LOG_SEVERITY_INFO ::kls::LogSeverity::kInfo
#define KLS_LOG_SEVERITY_WARNING ::kls::LogSeverity::kWarning
#define KLS_LOG_SEVERITY_ERROR ::kls::LogSeverity::kError
#define KLS_LOG_SEVERITY_FATAL ::kls::LogSeverity::kFatal

#define KLS_LOG(level)                                 \
  (KLS_LOG_SEVERITY_##level < ::kls::MinLogSeverity()) \
      ? (void)0                                        \
      : ::kls::internal::LogVoidify() &                \
            ::kls::internal::LogMessage(KLS_LOG_SEVERITY_##level, __FILE__, __LINE__).stream()

#define KLS_CHECK(cond)                                                                          \
  (cond)                                                                                         \
      ? (void)0                                                                                  \
      : ::kls::internal::LogVoidify() &                                                          \
            ::kls::internal::LogMessage(::kls::LogSeverity::kFatal, __FILE__, __LINE__).stream() \
                << "Check failed: " #cond " "

#endif  // KLS_COMMON_LOGGING_H_
