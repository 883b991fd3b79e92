// A plain HTTP/1.0 GET over a TCP socket, for tests that scrape /metrics: no HTTP library is
// involved, so the tests see exactly the bytes a Prometheus server would.
#ifndef KLS_TESTS_SERVICES_COMMON_HTTP_GET_H_
#define KLS_TESTS_SERVICES_COMMON_HTTP_GET_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kls::testing {

struct HttpResponse {
  int status = 0;       // e.g. 200
  std::string headers;  // the status line and headers, CRLF-separated
  std::string body;
};

// GET `path` from 127.0.0.1:`port`; the server closes the connection after an HTTP/1.0 reply.
// UNAVAILABLE if it cannot connect, DATA_LOSS for a malformed reply; 10 s timeouts.
inline absl::StatusOr<HttpResponse> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("socket failed");
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to port ", port));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1:", port,
                                           "\r\nAccept: text/plain\r\n\r\n");
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      close(fd);
      return absl::UnavailableError("send failed");
    }
    sent += static_cast<size_t>(n);
  }
  std::string reply;
  char buffer[4096];
  for (;;) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n < 0) {
      close(fd);
      return absl::UnavailableError("recv failed or timed out");
    }
    if (n == 0) break;
    reply.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  const size_t end = reply.find("\r\n\r\n");
  if (end == std::string::npos || reply.compare(0, 7, "HTTP/1.") != 0 || reply.size() < 12) {
    return absl::DataLossError(absl::StrCat("malformed HTTP reply: '", reply.substr(0, 200), "'"));
  }
  HttpResponse response;
  response.headers = reply.substr(0, end);
  response.body = reply.substr(end + 4);
  if (!absl::SimpleAtoi(reply.substr(9, 3), &response.status)) {
    return absl::DataLossError(absl::StrCat("bad status line: '", reply.substr(0, 40), "'"));
  }
  return response;
}

// The value of the sample line "<series> <value>" in a text-format body (`series` includes its
// labels, e.g. `kls_worker_info{model_fingerprint="ab12"}`); nullopt when absent or malformed.
inline std::optional<double> SampleValue(const std::string& body, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (line.size() > series.size() && line.substr(0, series.size()) == series &&
        line[series.size()] == ' ') {
      double value = 0;
      std::string text(line.substr(series.size() + 1));
      if (absl::SimpleAtod(text, &value)) return value;
      return std::nullopt;
    }
  }
  return std::nullopt;
}

}  // namespace kls::testing

#endif  // KLS_TESTS_SERVICES_COMMON_HTTP_GET_H_
