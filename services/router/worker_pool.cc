#include "services/router/worker_pool.h"

#include <arpa/inet.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"
#include "common/logging.h"
#include "common/rendezvous.h"
#include "services/common/grpc_status.h"

namespace kls::router {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr absl::string_view kDnsScheme = "dns:";

// Splits "host:port" or "[v6]:port". The port must be a number in 1..65535.
absl::Status SplitHostPort(std::string_view target, std::string_view host_port, std::string* host,
                           std::string* port) {
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker target \"", std::string(target), "\": ", std::string(why)));
  };
  size_t colon;
  if (!host_port.empty() && host_port.front() == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string_view::npos) return bad("unterminated '[' in an IPv6 address");
    *host = std::string(host_port.substr(1, close - 1));
    colon = close + 1;
    if (colon >= host_port.size() || host_port[colon] != ':') return bad("want [address]:port");
  } else {
    colon = host_port.rfind(':');
    if (colon == std::string_view::npos) return bad("want name:port (the port is required)");
    *host = std::string(host_port.substr(0, colon));
  }
  *port = std::string(host_port.substr(colon + 1));
  uint32_t port_number = 0;
  if (!absl::SimpleAtoi(*port, &port_number) || port_number == 0 || port_number > 65535) {
    return bad(absl::StrCat("port \"", *port, "\" is not a number in 1..65535"));
  }
  if (host->empty()) return bad("empty host name");
  return absl::OkStatus();
}

// Every address `host` resolves to, as "a.b.c.d:port" or "[v6]:port", sorted and unique. A
// name that does not exist resolves to nothing (a headless Service with no ready pods);
// UNAVAILABLE for failures that say nothing about the set (e.g. the resolver is unreachable).
absl::StatusOr<std::set<std::string>> ResolveAll(const std::string& host, const std::string& port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
  std::set<std::string> addresses;
  if (rc == EAI_NONAME
#ifdef EAI_NODATA
      || rc == EAI_NODATA
#endif
  ) {
    return addresses;
  }
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("getaddrinfo(\"", host, "\", \"", port, "\"): ", gai_strerror(rc)));
  }
  for (const addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(ai->ai_addr);
      if (inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text)) == nullptr) continue;
      addresses.insert(absl::StrCat(text, ":", ntohs(sin->sin_port)));
    } else if (ai->ai_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(ai->ai_addr);
      if (inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof(text)) == nullptr) continue;
      addresses.insert(absl::StrCat("[", text, "]:", ntohs(sin6->sin6_port)));
    }
  }
  freeaddrinfo(result);
  return addresses;
}

std::string StatusText(const grpc::Status& status) {
  return services::FromGrpcStatus(status).ToString();
}

}  // namespace

WorkerEndpoint::WorkerEndpoint(std::string name, std::shared_ptr<grpc::Channel> channel)
    : name_(std::move(name)),
      channel_(std::move(channel)),
      stub_(kls::v1::Worker::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {}

WorkerPool::~WorkerPool() { Shutdown(); }

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Create(WorkerPoolOptions options) {
  if (options.health_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("health_interval must be positive, got ",
                                                   absl::FormatDuration(options.health_interval)));
  }
  if (options.health_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("health_timeout must be positive, got ",
                                                   absl::FormatDuration(options.health_timeout)));
  }
  if (options.dns_refresh_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dns_refresh_interval must be positive, got ",
                     absl::FormatDuration(options.dns_refresh_interval)));
  }
  auto pool = absl::WrapUnique(new WorkerPool(std::move(options)));
  absl::Status status = pool->AddStaticEndpoints();
  if (!status.ok()) return status;
  pool->watcher_ = std::thread([p = pool.get()] { p->WatchLoop(); });
  return pool;
}

std::shared_ptr<grpc::Channel> WorkerPool::MakeChannel(const std::string& target) const {
  grpc::ChannelArguments args;
  // The probes are the only traffic to a worker that is down; gRPC's default reconnect backoff
  // grows to 120 s, which would keep a restarted worker out of the pool for minutes.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(
      target, options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials(),
      args);
}

absl::Status WorkerPool::AddStaticEndpoints() {
  std::map<std::string, std::shared_ptr<grpc::Channel>> statics;
  std::set<std::string> dns_seen;
  for (const std::string& target : options_.targets) {
    const std::string trimmed(absl::StripAsciiWhitespace(target));
    if (trimmed.empty()) return absl::InvalidArgumentError("empty worker target");
    if (absl::StartsWith(trimmed, kDnsScheme)) {
      absl::string_view rest = absl::string_view(trimmed).substr(kDnsScheme.size());
      if (!absl::StartsWith(rest, "///")) {
        return absl::InvalidArgumentError(
            absl::StrCat("worker target \"", trimmed,
                         "\": want dns:///name:port (a DNS server authority is not supported)"));
      }
      DnsTarget dns{trimmed, "", ""};
      absl::Status s = SplitHostPort(trimmed, std::string_view(rest.data() + 3, rest.size() - 3),
                                     &dns.host, &dns.port);
      if (!s.ok()) return s;
      if (!dns_seen.insert(trimmed).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("duplicate worker target \"", trimmed, "\""));
      }
      dns_targets_.push_back(std::move(dns));
      continue;
    }
    if (statics.count(trimmed) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate worker target \"", trimmed, "\""));
    }
    statics.emplace(trimmed, MakeChannel(trimmed));
  }
  for (const NamedChannel& named : options_.channels) {
    if (named.name.empty() || named.channel == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker channel \"", named.name, "\" needs both a name and a channel"));
    }
    if (!statics.emplace(named.name, named.channel).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate worker endpoint name \"", named.name, "\""));
    }
  }
  absl::MutexLock lock(&mu_);
  for (auto& [name, channel] : statics) {
    EndpointState state;
    state.endpoint = std::make_shared<WorkerEndpoint>(name, std::move(channel));
    state.status.name = name;
    state.status.last_error = "not probed yet";
    endpoints_.emplace(name, std::move(state));
    static_names_.insert(name);
  }
  if (endpoints_.empty() && dns_targets_.empty()) {
    KLS_LOG(WARNING) << "worker pool has no targets: every request will fail with UNAVAILABLE";
  }
  return absl::OkStatus();
}

void WorkerPool::WatchLoop() {
  while (true) {
    RunRound(/*force_dns=*/false);
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.health_interval)) return;
  }
}

void WorkerPool::TEST_RunProbeRound() { RunRound(/*force_dns=*/true); }

void WorkerPool::RunRound(bool force_dns) {
  absl::MutexLock round_lock(&round_mu_);
  if (!dns_targets_.empty() && (force_dns || absl::Now() >= next_dns_refresh_)) {
    RefreshDns();
    next_dns_refresh_ = absl::Now() + options_.dns_refresh_interval;
  }
  ProbeAll();
  // Endpoints that left DNS go once no call holds them, on this thread (see WorkerEndpoint).
  std::erase_if(retired_, [](const std::shared_ptr<WorkerEndpoint>& endpoint) {
    return endpoint.use_count() == 1;
  });
}

void WorkerPool::RefreshDns() {
  // Resolve without mu_ held: getaddrinfo blocks for as long as the resolver takes.
  std::map<std::string, absl::StatusOr<std::set<std::string>>> resolved;
  for (const DnsTarget& dns : dns_targets_) {
    resolved.emplace(dns.target, options_.TEST_resolver ? options_.TEST_resolver(dns.host, dns.port)
                                                        : ResolveAll(dns.host, dns.port));
  }
  std::map<std::string, std::shared_ptr<grpc::Channel>> new_channels;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [target, addresses] : resolved) {
      if (!addresses.ok()) {
        KLS_LOG(WARNING) << "worker target " << target
                         << ": keeping the last known addresses: " << addresses.status();
        continue;
      }
      dns_members_[target] = std::move(*addresses);
    }
    std::set<std::string> wanted = static_names_;
    for (const auto& [target, members] : dns_members_)
      wanted.insert(members.begin(), members.end());
    for (auto it = endpoints_.begin(); it != endpoints_.end();) {
      if (wanted.count(it->first) != 0) {
        ++it;
        continue;
      }
      KLS_LOG(INFO) << "worker " << it->first << " left DNS; dropped";
      if (it->second.status.ready) --num_ready_;
      retired_.push_back(std::move(it->second.endpoint));
      it = endpoints_.erase(it);
    }
    for (const std::string& name : wanted) {
      if (endpoints_.count(name) == 0) new_channels.emplace(name, nullptr);
    }
  }
  if (new_channels.empty()) return;
  for (auto& [name, channel] : new_channels) channel = MakeChannel(name);
  absl::MutexLock lock(&mu_);
  for (auto& [name, channel] : new_channels) {
    if (endpoints_.count(name) != 0) continue;
    KLS_LOG(INFO) << "worker " << name << " joined from DNS";
    EndpointState state;
    state.endpoint = std::make_shared<WorkerEndpoint>(name, std::move(channel));
    state.status.name = name;
    state.status.last_error = "not probed yet";
    endpoints_.emplace(name, std::move(state));
  }
}

void WorkerPool::ProbeAll() {
  struct Probe {
    std::shared_ptr<WorkerEndpoint> endpoint;
    grpc::ClientContext health_context;
    HealthCheckRequest health_request;
    HealthCheckResponse health_response;
    grpc::Status health_status;
    grpc::ClientContext load_context;
    kls::v1::GetLoadRequest load_request;
    kls::v1::Load load;
    grpc::Status load_status;
  };
  // The probes live in this frame, and the callbacks only point at them: this thread, not a gRPC
  // callback thread, drops the probes' endpoint references (see RouterService::
  // WaitForProxiedCalls for why a channel must never die on a callback thread).
  std::vector<std::unique_ptr<Probe>> probes;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [name, state] : endpoints_) {
      probes.push_back(std::make_unique<Probe>());
      probes.back()->endpoint = state.endpoint;
    }
  }
  if (probes.empty()) return;
  const absl::Time started = absl::Now();
  const auto deadline = absl::ToChronoTime(started + options_.health_timeout);
  // Safe to destroy once Wait returns, even while the last callback is still returning.
  absl::BlockingCounter pending(2 * static_cast<int>(probes.size()));
  for (const std::unique_ptr<Probe>& p : probes) {
    Probe* probe = p.get();
    probe->health_context.set_deadline(deadline);
    probe->load_context.set_deadline(deadline);
    probe->health_request.set_service("");  // the server's overall health
    probe->endpoint->health_stub()->async()->Check(&probe->health_context, &probe->health_request,
                                                   &probe->health_response,
                                                   [&pending, probe](grpc::Status status) {
                                                     probe->health_status = std::move(status);
                                                     pending.DecrementCount();
                                                   });
    probe->endpoint->stub()->async()->GetLoad(&probe->load_context, &probe->load_request,
                                              &probe->load, [&pending, probe](grpc::Status status) {
                                                probe->load_status = std::move(status);
                                                pending.DecrementCount();
                                              });
  }
  pending.Wait();

  absl::MutexLock lock(&mu_);
  for (const std::unique_ptr<Probe>& probe : probes) {
    auto it = endpoints_.find(probe->endpoint->name());
    if (it == endpoints_.end() || it->second.endpoint != probe->endpoint) continue;  // left
    EndpointState& state = it->second;
    EndpointStatus& status = state.status;
    status.probed = true;
    std::string error;
    status.serving = probe->health_status.ok() &&
                     probe->health_response.status() == HealthCheckResponse::SERVING;
    if (!probe->health_status.ok()) {
      error = absl::StrCat("health Check failed: ", StatusText(probe->health_status));
    } else if (!status.serving) {
      error =
          absl::StrCat("health status ",
                       HealthCheckResponse::ServingStatus_Name(probe->health_response.status()));
    }
    bool load_known = true;
    if (probe->load_status.ok()) {
      status.load = probe->load;
      status.draining = probe->load.draining();
      if (status.draining && error.empty()) error = "draining";
    } else if (probe->load_status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      status.draining = false;  // a worker without load reports cannot announce a drain
    } else {
      load_known = false;
      if (error.empty()) error = absl::StrCat("GetLoad failed: ", StatusText(probe->load_status));
    }
    if (error.empty() && started < state.unavailable_since) {
      error = "marked unavailable after a failed call";
    }
    status.last_error = error;
    SetReadyLocked(state, status.serving && load_known && !status.draining &&
                              started >= state.unavailable_since);
  }
}

void WorkerPool::SetReadyLocked(EndpointState& state, bool ready) {
  if (state.status.ready == ready) return;
  state.status.ready = ready;
  if (ready) {
    ++num_ready_;
    KLS_LOG(INFO) << "worker " << state.status.name << " is ready";
  } else {
    --num_ready_;
    KLS_LOG(WARNING) << "worker " << state.status.name
                     << " is not ready: " << state.status.last_error;
  }
}

std::vector<EndpointPtr> WorkerPool::Rank(std::string_view key) const {
  std::vector<std::string> names;
  std::vector<EndpointPtr> ready;
  {
    absl::MutexLock lock(&mu_);
    names.reserve(num_ready_);
    ready.reserve(num_ready_);
    for (const auto& [name, state] : endpoints_) {
      if (!state.status.ready) continue;
      names.push_back(name);
      ready.push_back(state.endpoint);
    }
  }
  std::vector<EndpointPtr> ranked;
  ranked.reserve(ready.size());
  for (size_t index : RendezvousRank(key, names, names.size())) ranked.push_back(ready[index]);
  return ranked;
}

void WorkerPool::MarkUnavailable(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = endpoints_.find(name);
  if (it == endpoints_.end()) return;
  it->second.unavailable_since = absl::Now();
  it->second.status.last_error = "marked unavailable after a failed call";
  SetReadyLocked(it->second, false);
}

absl::Status WorkerPool::WaitForReady(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  if (mu_.AwaitWithTimeout(absl::Condition(
                               +[](const size_t* n) { return *n > 0; }, &num_ready_),
                           timeout)) {
    return absl::OkStatus();
  }
  std::vector<std::string> states;
  for (const auto& [name, state] : endpoints_) {
    states.push_back(absl::StrCat(name, " (", state.status.last_error, ")"));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("no worker ready after ", absl::FormatDuration(timeout),
                   "; endpoints: ", states.empty() ? "none" : absl::StrJoin(states, ", ")));
}

std::vector<EndpointStatus> WorkerPool::Endpoints() const {
  absl::MutexLock lock(&mu_);
  std::vector<EndpointStatus> out;
  out.reserve(endpoints_.size());
  for (const auto& [name, state] : endpoints_) out.push_back(state.status);
  return out;
}

void WorkerPool::Shutdown() {
  std::call_once(shutdown_once_, [this] {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (watcher_.joinable()) watcher_.join();
  });
}

}  // namespace kls::router
