#include "services/store/store_service.h"

#include <gmock/gmock.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/rendezvous.h"
#include "services/common/grpc_status.h"
#include "services/store/remote_shard.h"
#include "services/store/rocksdb_shard.h"
#include "services/store/session_store.h"
#include "tests/services/store/store_test_util.h"
#include "tests/test_util.h"

namespace kls::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Optional;

// A shard that fails every call with a fixed status (to check statuses cross the wire).
class FailingShard final : public Shard {
 public:
  explicit FailingShard(absl::Status status) : status_(std::move(status)) {}
  const std::string& name() const override { return name_; }
  absl::Status Write(const WriteBatchSpec&) override { return status_; }
  absl::StatusOr<std::vector<std::optional<std::string>>> Read(
      Family, const std::vector<std::string>&) override {
    return status_;
  }
  absl::Status Scan(Family, std::string_view, std::string_view, uint32_t, bool,
                    const std::function<bool(std::string_view, std::string_view)>&) override {
    return status_;
  }

 private:
  absl::Status status_;
  std::string name_ = "failing";
};

// One shard served on an ephemeral loopback port.
class ServedShard {
 public:
  // Serves `shard` (not owned). Small read pages, so tests cross page boundaries.
  explicit ServedShard(Shard* shard) {
    StateStoreServiceOptions options;
    options.io_threads = 2;
    options.read_page_bytes = 2 << 20;
    service_ = std::make_unique<StateStoreService>(shard, options);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
  }
  ~ServedShard() { Stop(); }

  void Stop() {
    if (server_ != nullptr) server_->Shutdown();
    server_.reset();
    service_.reset();
  }
  bool started() const { return server_ != nullptr && port_ != 0; }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }

 private:
  int port_ = 0;
  std::unique_ptr<StateStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
};

std::unique_ptr<RocksDbShard> OpenShard(const std::string& dir, const std::string& name = "") {
  RocksDbShardOptions options;
  options.dir = dir;
  options.name = name;
  options.write_buffer_bytes = 16 << 20;
  absl::StatusOr<std::unique_ptr<RocksDbShard>> shard = RocksDbShard::Open(options);
  EXPECT_TRUE(shard.ok()) << shard.status();
  return shard.ok() ? std::move(*shard) : nullptr;
}

class StoreServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir();
    local_ = OpenShard(dir_ + "/db");
    ASSERT_NE(local_, nullptr);
    served_ = std::make_unique<ServedShard>(local_.get());
    ASSERT_TRUE(served_->started());
    absl::StatusOr<std::unique_ptr<RemoteShard>> remote =
        RemoteShard::Create(served_->target(), RemoteShardOptions());
    ASSERT_TRUE(remote.ok()) << remote.status();
    remote_ = std::move(*remote);
  }
  void TearDown() override {
    remote_.reset();
    served_.reset();
    local_.reset();
    testing::RemoveTree(dir_);
  }

  std::unique_ptr<kls::v1::StateStore::Stub> RawStub() {
    return kls::v1::StateStore::NewStub(
        grpc::CreateChannel(served_->target(), grpc::InsecureChannelCredentials()));
  }

  // Scans through the RPC; returns (key, value) pairs.
  std::vector<std::pair<std::string, std::string>> RemoteScan(Family family, std::string prefix,
                                                              std::string start_after,
                                                              uint32_t limit, bool keys_only) {
    std::vector<std::pair<std::string, std::string>> entries;
    absl::Status status = remote_->Scan(family, prefix, start_after, limit, keys_only,
                                        [&](std::string_view key, std::string_view value) {
                                          entries.emplace_back(key, value);
                                          return true;
                                        });
    EXPECT_TRUE(status.ok()) << status;
    return entries;
  }

  std::string dir_;
  std::unique_ptr<RocksDbShard> local_;
  std::unique_ptr<ServedShard> served_;
  std::unique_ptr<RemoteShard> remote_;
};

TEST_F(StoreServiceTest, TwentyMiBValueRoundTrips) {
  const std::string big = RandomBytes(20 << 20, 1);
  WriteBatchSpec batch = Batch({Put(kState, "s/big", big), Put(kSessions, "t/s", RecordValue(1))});
  batch.sync = true;
  batch.expect_no_record = true;
  ASSERT_TRUE(remote_->Write(batch).ok());

  absl::StatusOr<std::vector<std::optional<std::string>>> local = local_->Read(kState, {"s/big"});
  ASSERT_TRUE(local.ok());
  EXPECT_TRUE((*local)[0] == big);  // the server stored it whole

  absl::StatusOr<std::vector<std::optional<std::string>>> values =
      remote_->Read(kState, {"s/missing", "s/big"});
  ASSERT_TRUE(values.ok()) << values.status();
  ASSERT_EQ(values->size(), 2u);
  EXPECT_EQ((*values)[0], std::nullopt);
  ASSERT_TRUE((*values)[1].has_value());
  EXPECT_EQ((*values)[1]->size(), big.size());
  EXPECT_TRUE(*(*values)[1] == big);

  std::vector<std::pair<std::string, std::string>> scanned =
      RemoteScan(kState, "s/", "", 0, /*keys_only=*/false);
  ASSERT_EQ(scanned.size(), 1u);
  EXPECT_EQ(scanned[0].first, "s/big");
  EXPECT_TRUE(scanned[0].second == big);
}

TEST_F(StoreServiceTest, ReadStreamsManyValuesAcrossPages) {
  WriteBatchSpec batch;
  std::vector<std::string> values;
  for (int i = 0; i < 10; ++i) {
    values.push_back(RandomBytes(700 << 10, 10 + i));  // several values per 2 MiB page
    batch.ops.push_back(Put(kBlocks, absl::StrCat("b", i), values.back()));
  }
  batch.ops.push_back(Put(kBlocks, "empty", ""));
  ASSERT_TRUE(remote_->Write(batch).ok());

  const std::vector<std::string> keys = {"b9", "empty", "nope", "b0", "b9", "b3", "b4",
                                         "b5", "b6",    "b7",   "b8", "b1", "b2"};
  absl::StatusOr<std::vector<std::optional<std::string>>> got = remote_->Read(kBlocks, keys);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    SCOPED_TRACE(keys[i]);
    if (keys[i] == "nope") {
      EXPECT_EQ((*got)[i], std::nullopt);
    } else if (keys[i] == "empty") {
      EXPECT_THAT((*got)[i], Optional(std::string()));
    } else {
      ASSERT_TRUE((*got)[i].has_value());
      EXPECT_TRUE(*(*got)[i] == values[keys[i][1] - '0']);
    }
  }
  absl::StatusOr<std::vector<std::optional<std::string>>> none = remote_->Read(kBlocks, {});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST_F(StoreServiceTest, ScanHonorsPrefixStartAfterAndLimitAcrossPages) {
  WriteBatchSpec batch;
  for (int i = 0; i < 2500; ++i) {
    batch.ops.push_back(Put(kSessions, absl::StrFormat("t/%05d", i), absl::StrCat("v", i)));
  }
  batch.ops.push_back(Put(kSessions, "u/00000", "other prefix"));
  ASSERT_TRUE(remote_->Write(batch).ok());

  std::vector<std::pair<std::string, std::string>> all =
      RemoteScan(kSessions, "t/", "", 0, /*keys_only=*/false);
  ASSERT_EQ(all.size(), 2500u);  // more than one page of keys
  for (int i = 0; i < 2500; ++i) {
    ASSERT_EQ(all[i].first, absl::StrFormat("t/%05d", i));
    ASSERT_EQ(all[i].second, absl::StrCat("v", i));
  }
  std::vector<std::pair<std::string, std::string>> window =
      RemoteScan(kSessions, "t/", "t/00099", 1500, /*keys_only=*/true);
  ASSERT_EQ(window.size(), 1500u);
  EXPECT_EQ(window.front().first, "t/00100");
  EXPECT_EQ(window.back().first, "t/01599");
  EXPECT_EQ(window.front().second, "");
  EXPECT_THAT(RemoteScan(kSessions, "t/", "t/02497", 10, true),
              ElementsAre(std::pair<std::string, std::string>("t/02498", ""),
                          std::pair<std::string, std::string>("t/02499", "")));
  EXPECT_TRUE(RemoteScan(kSessions, "v/", "", 0, true).empty());

  // Large values: several byte-budget pages, each value in pieces.
  WriteBatchSpec large;
  for (int i = 0; i < 3; ++i)
    large.ops.push_back(Put(kState, absl::StrCat("x", i), RandomBytes(3 << 20, i)));
  ASSERT_TRUE(remote_->Write(large).ok());
  std::vector<std::pair<std::string, std::string>> big = RemoteScan(kState, "x", "", 0, false);
  ASSERT_EQ(big.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(big[i].second == large.ops[i].value) << i;

  // The visitor stops early: the call ends OK.
  int seen = 0;
  EXPECT_TRUE(remote_
                  ->Scan(kSessions, "t/", "", 0, false,
                         [&](std::string_view, std::string_view) { return ++seen < 5; })
                  .ok());
  EXPECT_EQ(seen, 5);
}

TEST_F(StoreServiceTest, RecordCheckConflictIsAbortedAndWritesNothing) {
  WriteBatchSpec create = Batch({Put(kSessions, "t/s", RecordValue(1))});
  create.expect_no_record = true;
  ASSERT_TRUE(remote_->Write(create).ok());
  absl::Status again = remote_->Write(create);
  EXPECT_EQ(again.code(), absl::StatusCode::kAborted);

  WriteBatchSpec stale =
      Batch({Put(kState, "s/2/0", RandomBytes(3 << 20, 4)), Put(kSessions, "t/s", RecordValue(2))});
  stale.expected_record_version = 0;
  absl::Status status = remote_->Write(stale);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;
  EXPECT_THAT(status.message(), HasSubstr("has version 1"));
  EXPECT_EQ((*local_->Read(kState, {"s/2/0"}))[0], std::nullopt);

  stale.expected_record_version = 1;
  EXPECT_TRUE(remote_->Write(stale).ok());
  EXPECT_TRUE((*local_->Read(kState, {"s/2/0"}))[0].has_value());
}

TEST_F(StoreServiceTest, BadRequestsAreInvalidArgument) {
  std::unique_ptr<kls::v1::StateStore::Stub> stub = RawStub();
  // Each case: the messages of one Write stream; none is applied.
  auto write = [&](const std::vector<kls::v1::WriteRequest>& messages, bool half_close) {
    grpc::ClientContext context;
    kls::v1::WriteResponse response;
    auto writer = stub->Write(&context, &response);
    for (const kls::v1::WriteRequest& message : messages) {
      if (!writer->Write(message)) break;
    }
    if (half_close) writer->WritesDone();
    return services::FromGrpcStatus(writer->Finish());
  };
  kls::v1::WriteRequest start;
  start.set_family(kState);
  start.set_key("k");
  start.set_value_piece("v");
  kls::v1::WriteRequest piece;
  piece.set_value_piece("more");
  kls::v1::WriteRequest commit;
  commit.set_commit(true);

  EXPECT_EQ(write({piece, commit}, true).code(), absl::StatusCode::kInvalidArgument);
  kls::v1::WriteRequest unknown = start;
  unknown.set_family(static_cast<Family>(9));
  absl::Status status = write({unknown, commit}, true);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("unknown column family 9"));
  status = write({start, piece}, true);  // no commit
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("without a commit"));
  kls::v1::WriteRequest remove;
  remove.set_family(kState);
  remove.set_key("k");
  remove.set_is_delete(true);
  EXPECT_EQ(write({remove, piece, commit}, true).code(), absl::StatusCode::kInvalidArgument);
  kls::v1::WriteRequest keyless = start;
  keyless.clear_key();
  EXPECT_EQ(write({keyless, commit}, true).code(), absl::StatusCode::kInvalidArgument);
  kls::v1::WriteRequest early_sync = start;
  early_sync.set_sync(true);
  EXPECT_EQ(write({early_sync, commit}, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*local_->Read(kState, {"k"}))[0], std::nullopt);

  // The well-formed stream applies: "v" + "more".
  EXPECT_TRUE(write({start, piece, commit}, false).ok());
  EXPECT_THAT((*local_->Read(kState, {"k"}))[0], Optional(std::string("vmore")));
  EXPECT_TRUE(write({commit}, false).ok());  // an empty batch

  EXPECT_EQ(remote_->Read(static_cast<Family>(0), {"k"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(remote_
                ->Scan(static_cast<Family>(7), "", "", 0, true,
                       [](std::string_view, std::string_view) { return true; })
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(remote_->Write(Batch({Put(static_cast<Family>(5), "k", "v")})).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(StoreServiceTest, ShardErrorsCrossTheWireUnchanged) {
  for (absl::StatusCode code : {absl::StatusCode::kDataLoss, absl::StatusCode::kAborted,
                                absl::StatusCode::kUnavailable, absl::StatusCode::kInternal}) {
    FailingShard failing(absl::Status(code, "shard says no"));
    ServedShard served(&failing);
    ASSERT_TRUE(served.started());
    absl::StatusOr<std::unique_ptr<RemoteShard>> remote =
        RemoteShard::Create(served.target(), RemoteShardOptions());
    ASSERT_TRUE(remote.ok());
    absl::Status write = (*remote)->Write(Batch({Put(kState, "k", "v")}));
    EXPECT_EQ(write.code(), code);
    EXPECT_THAT(write.message(), HasSubstr("shard says no"));
    EXPECT_EQ((*remote)->Read(kState, {"k"}).status().code(), code);
    EXPECT_EQ((*remote)
                  ->Scan(kState, "", "", 0, false,
                         [](std::string_view, std::string_view) { return true; })
                  .code(),
              code);
  }
}

// A loopback TCP port that accepts connections (the kernel does) but never speaks HTTP/2:
// a hung peer. Closes on destruction.
class SilentListener {
 public:
  SilentListener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
        ::listen(fd_, 16) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      ADD_FAILURE() << "cannot listen on loopback";
      return;
    }
    port_ = ntohs(address.sin_port);
  }
  ~SilentListener() {
    if (fd_ >= 0) ::close(fd_);
  }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
};

TEST_F(StoreServiceTest, UnreachableShardIsUnavailable) {
  ServedShard gone(local_.get());
  const std::string refused = gone.target();
  gone.Stop();            // nothing listens there now: connection refused
  SilentListener silent;  // connects at TCP level, never answers: the deadline runs out
  for (const std::string& where : {refused, silent.target()}) {
    SCOPED_TRACE(where);
    RemoteShardOptions options;
    options.call_deadline = absl::Milliseconds(500);
    absl::StatusOr<std::unique_ptr<RemoteShard>> remote = RemoteShard::Create(where, options);
    ASSERT_TRUE(remote.ok());
    EXPECT_EQ((*remote)->Write(Batch({Put(kState, "k", "v")})).code(),
              absl::StatusCode::kUnavailable);
    EXPECT_EQ((*remote)->Read(kState, {"k"}).status().code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(
        (*remote)
            ->Scan(kState, "", "", 0, true, [](std::string_view, std::string_view) { return true; })
            .code(),
        absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(RemoteShard::Create("", RemoteShardOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(StoreServiceClusterTest, SessionStoreOverRemoteShardsSurvivesAServerDown) {
  const std::string dir = testing::MakeTempDir();
  std::vector<std::unique_ptr<RocksDbShard>> locals;
  std::vector<std::unique_ptr<ServedShard>> servers;
  std::vector<std::unique_ptr<Shard>> remotes;
  for (int i = 0; i < 3; ++i) {
    locals.push_back(OpenShard(absl::StrCat(dir, "/shard-", i)));
    ASSERT_NE(locals.back(), nullptr);
    servers.push_back(std::make_unique<ServedShard>(locals.back().get()));
    ASSERT_TRUE(servers.back()->started());
    remotes.push_back(std::move(*RemoteShard::Create(servers.back()->target(), {})));
  }
  SessionStoreOptions options;
  options.replication = 2;
  absl::StatusOr<std::unique_ptr<SessionStore>> store =
      SessionStore::Create(std::move(remotes), options);
  ASSERT_TRUE(store.ok()) << store.status();

  auto commit = [&](uint64_t version, std::optional<uint64_t> expected) {
    CommitRequest request;
    request.record.set_tenant("t");
    request.record.set_session_id("s");
    request.record.set_version(version);
    request.record.set_state_chunks(1);
    request.record.set_num_history_tokens(3);
    request.record.add_block_keys("0123456789abcdef");
    request.state_chunks.push_back(RandomBytes(5 << 20, version));
    request.blocks.emplace_back("0123456789abcdef", RandomBytes(3 << 20, 99));
    request.tokens = {1, 2, static_cast<int32_t>(version)};
    request.expected_version = expected;
    return (*store)->Commit(std::move(request));
  };
  ASSERT_TRUE(commit(0, std::nullopt).ok());
  absl::StatusOr<std::vector<std::string>> chunks = (*store)->GetStateChunks("s", 0, 1);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  EXPECT_TRUE((*chunks)[0] == RandomBytes(5 << 20, 0));

  // Stop the session's first replica.
  std::vector<std::string> names;
  for (const auto& server : servers) names.push_back(server->target());
  servers[RendezvousRank("s", names, 2)[0]]->Stop();
  absl::StatusOr<kls::v1::SessionRecord> record = (*store)->GetRecord("t", "s");
  ASSERT_TRUE(record.ok()) << record.status();
  EXPECT_EQ(record->version(), 0u);
  absl::Status status = commit(1, 0);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ((*store)->GetRecord("t", "s")->version(), 1u);
  EXPECT_THAT(*(*store)->GetTokens("s"), ElementsAre(1, 2, 1));
  absl::StatusOr<std::vector<std::string>> blocks = (*store)->GetBlocks({"0123456789abcdef"});
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_TRUE((*blocks)[0] == RandomBytes(3 << 20, 99));

  store->reset();
  servers.clear();
  locals.clear();
  testing::RemoveTree(dir);
}

}  // namespace
}  // namespace kls::store
