#include "services/store/remote_shard.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "services/common/grpc_status.h"

namespace kls::store {
namespace {

// Ends a call the client gives up on (bad response, visitor stop) and reaps it.
template <typename Reader>
void CancelAndFinish(grpc::ClientContext& context, Reader& reader) {
  context.TryCancel();
  reader.Finish().ok();  // CANCELLED: we asked for it.
}

}  // namespace

absl::StatusOr<std::unique_ptr<RemoteShard>> RemoteShard::Create(
    const std::string& target, const RemoteShardOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("empty store shard target");
  return std::make_unique<RemoteShard>(
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials()), target, options);
}

RemoteShard::RemoteShard(std::shared_ptr<grpc::Channel> channel, std::string name,
                         const RemoteShardOptions& options)
    : channel_(std::move(channel)),
      stub_(kls::v1::StateStore::NewStub(channel_)),
      name_(std::move(name)),
      options_(options) {}

std::unique_ptr<grpc::ClientContext> RemoteShard::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (options_.call_deadline != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + options_.call_deadline));
  }
  return context;
}

absl::Status RemoteShard::CallStatus(const grpc::Status& status, std::string_view method) const {
  if (status.ok()) return absl::OkStatus();
  absl::Status result = services::FromGrpcStatus(status);
  // A call that waited out its deadline on a channel that never connected did not reach the
  // shard: that is "unreachable", which SessionStore treats as a down replica.
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
      channel_->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
    result = absl::UnavailableError(result.message());
  }
  return absl::Status(result.code(), absl::StrCat("store shard ", name_, ": ",
                                                  absl::string_view(method.data(), method.size()),
                                                  ": ", result.message()));
}

absl::Status RemoteShard::Write(const WriteBatchSpec& batch) {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  kls::v1::WriteResponse response;
  std::unique_ptr<grpc::ClientWriter<kls::v1::WriteRequest>> writer =
      stub_->Write(context.get(), &response);
  kls::v1::WriteRequest request;
  // Sends `request`; the last message carries the commit and half-closes the stream.
  auto send = [&](bool last) {
    if (last) {
      request.set_commit(true);
      request.set_sync(batch.sync);
      if (batch.expected_record_version.has_value()) {
        request.set_expected_record_version(*batch.expected_record_version);
      }
      request.set_expect_no_record(batch.expect_no_record);
      return writer->Write(request, grpc::WriteOptions().set_last_message());
    }
    return writer->Write(request);
  };
  bool stream_ok = true;
  if (batch.ops.empty()) stream_ok = send(/*last=*/true);
  for (size_t i = 0; i < batch.ops.size() && stream_ok; ++i) {
    const WriteOp& op = batch.ops[i];
    size_t offset = 0;
    bool first = true;
    do {
      request.Clear();  // keeps the piece buffer's capacity
      if (first) {
        // Family is what marks a new operation; an unknown family is the server's to refuse.
        request.set_family(op.family);
        request.set_key(op.key);
        request.set_is_delete(op.is_delete);
      }
      const size_t piece = std::min(kMaxValuePieceBytes, op.value.size() - offset);
      request.set_value_piece(op.value.data() + offset, piece);
      offset += piece;
      first = false;
      stream_ok = send(/*last=*/i + 1 == batch.ops.size() && offset == op.value.size());
    } while (stream_ok && offset < op.value.size());
  }
  // A failed Write means the server already ended the call; Finish reports why.
  return CallStatus(writer->Finish(), "Write");
}

absl::StatusOr<std::vector<std::optional<std::string>>> RemoteShard::Read(
    Family family, const std::vector<std::string>& keys) {
  kls::v1::ReadRequest request;
  request.set_family(family);
  request.mutable_keys()->Reserve(static_cast<int>(keys.size()));
  for (const std::string& key : keys) request.add_keys(key);

  std::unique_ptr<grpc::ClientContext> context = NewContext();
  std::unique_ptr<grpc::ClientReader<kls::v1::ReadResponse>> reader =
      stub_->Read(context.get(), request);
  std::vector<std::optional<std::string>> values(keys.size());
  std::vector<bool> complete(keys.size(), false);
  size_t num_complete = 0;
  kls::v1::ReadResponse response;
  while (reader->Read(&response)) {
    const uint32_t index = response.key_index();
    if (index >= keys.size() || complete[index] ||
        (!response.found() && values[index].has_value())) {
      CancelAndFinish(*context, *reader);
      return absl::InternalError(absl::StrCat("store shard ", name_,
                                              ": Read: malformed response for key index ", index,
                                              " of ", keys.size()));
    }
    if (response.found()) {
      std::optional<std::string>& value = values[index];
      if (!value.has_value()) {
        value = std::move(*response.mutable_value_piece());  // the first piece: no copy
      } else {
        value->append(response.value_piece());
      }
    }
    if (!response.found() || response.last_piece()) {
      complete[index] = true;
      ++num_complete;
    }
  }
  KLS_RETURN_IF_ERROR(CallStatus(reader->Finish(), "Read"));
  if (num_complete != keys.size()) {
    return absl::InternalError(absl::StrCat("store shard ", name_, ": Read: answered ",
                                            num_complete, " of ", keys.size(), " keys"));
  }
  return values;
}

absl::Status RemoteShard::Scan(
    Family family, std::string_view prefix, std::string_view start_after, uint32_t limit,
    bool keys_only, const std::function<bool(std::string_view, std::string_view)>& visit) {
  kls::v1::ScanRequest request;
  request.set_family(family);
  request.set_prefix(prefix.data(), prefix.size());
  request.set_start_after(start_after.data(), start_after.size());
  request.set_limit(limit);
  request.set_keys_only(keys_only);

  std::unique_ptr<grpc::ClientContext> context = NewContext();
  std::unique_ptr<grpc::ClientReader<kls::v1::ScanResponse>> reader =
      stub_->Scan(context.get(), request);
  std::string key;
  std::string value;
  bool in_entry = false;  // pieces of `key` are still coming
  kls::v1::ScanResponse response;
  while (reader->Read(&response)) {
    if (!in_entry) {
      key = std::move(*response.mutable_key());
      value = std::move(*response.mutable_value_piece());
      in_entry = true;
    } else if (!response.key().empty() && response.key() != key) {
      CancelAndFinish(*context, *reader);
      return absl::InternalError(
          absl::StrCat("store shard ", name_, ": Scan: a new key before the last piece"));
    } else {
      value.append(response.value_piece());
    }
    if (response.last_piece()) {
      in_entry = false;
      if (!visit(key, value)) {
        CancelAndFinish(*context, *reader);
        return absl::OkStatus();
      }
    }
  }
  KLS_RETURN_IF_ERROR(CallStatus(reader->Finish(), "Scan"));
  if (in_entry) {
    return absl::InternalError(
        absl::StrCat("store shard ", name_, ": Scan: stream ended inside a value"));
  }
  return absl::OkStatus();
}

}  // namespace kls::store
