// RemoteShard: a Shard served by another process (`kls store`) over gRPC kls.v1.StateStore.
// Values travel in pieces of at most kMaxValuePieceBytes, so values of any size fit the default
// 4 MiB message limit.
#ifndef KLS_SERVICES_STORE_REMOTE_SHARD_H_
#define KLS_SERVICES_STORE_REMOTE_SHARD_H_

#include <grpcpp/channel.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kls/v1/store.grpc.pb.h"
#include "services/store/shard.h"

namespace kls::store {

struct RemoteShardOptions {
  // Deadline of each call (a whole Write, Read or Scan stream). Generous: one call may move
  // hundreds of MiB.
  absl::Duration call_deadline = absl::Seconds(60);
};

// Thread-safe: any number of threads may call any method concurrently (calls share the channel).
// Errors: the server's status unchanged (grpc_status.h); UNAVAILABLE when the server cannot be
// reached, including a deadline that expired before the channel ever connected.
class RemoteShard final : public Shard {
 public:
  // A shard at `target` ("host:port", any gRPC target URI) over an insecure channel; the name is
  // the target. Connects lazily: an unreachable target shows as UNAVAILABLE on the first call.
  // INVALID_ARGUMENT if the target is empty.
  static absl::StatusOr<std::unique_ptr<RemoteShard>> Create(const std::string& target,
                                                             const RemoteShardOptions& options);
  // A shard over an existing channel (any credentials); `name` is used for logs and hashing.
  RemoteShard(std::shared_ptr<grpc::Channel> channel, std::string name,
              const RemoteShardOptions& options);

  const std::string& name() const override { return name_; }
  absl::Status Write(const WriteBatchSpec& batch) override;
  absl::StatusOr<std::vector<std::optional<std::string>>> Read(
      Family family, const std::vector<std::string>& keys) override;
  absl::Status Scan(Family family, std::string_view prefix, std::string_view start_after,
                    uint32_t limit, bool keys_only,
                    const std::function<bool(std::string_view, std::string_view)>& visit) override;

 private:
  // A client context with the call deadline.
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // The call's status in absl, naming the shard and the method.
  absl::Status CallStatus(const grpc::Status& status, std::string_view method) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kls::v1::StateStore::Stub> stub_;
  std::string name_;
  RemoteShardOptions options_;
};

}  // namespace kls::store

#endif  // KLS_SERVICES_STORE_REMOTE_SHARD_H_
