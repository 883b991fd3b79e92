// Socket options for our cpp-httplib servers. httplib's default also sets SO_REUSEPORT, which lets
// a second process bind a port that is in use and silently share its traffic; our servers must own
// their port (a taken port is an error), so only SO_REUSEADDR (restart without TIME_WAIT delays).
#ifndef KLS_SERVICES_COMMON_HTTP_SOCKET_H_
#define KLS_SERVICES_COMMON_HTTP_SOCKET_H_

#include <sys/socket.h>

namespace kls::services {

inline void ExclusivePortSocketOptions(int sock) {
  int yes = 1;
  setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
}

}  // namespace kls::services

#endif  // KLS_SERVICES_COMMON_HTTP_SOCKET_H_
