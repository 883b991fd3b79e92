// StateStoreService: serves one Shard (a RocksDbShard) as gRPC kls.v1.StateStore with the
// callback API (HOUSE_STYLE.md H11). Reactor callbacks never do storage I/O: each shard call
// (apply a Write batch, read a page of values, scan a page of keys) runs on a small I/O pool,
// which then starts the stream's next write. Values stream in pieces of at most
// kMaxValuePieceBytes, and Read/Scan fetch at most ~read_page_bytes from the shard at a time, so a
// server's memory per call stays bounded whatever the client asks for.
//
// Protocol details the proto leaves open (RemoteShard speaks exactly this):
//  - Write: a message with a family starts an operation (non-empty key); a message without one
//    (and without key / is_delete) appends its value_piece to the current put. sync,
//    expected_record_version and expect_no_record belong on the commit message only. Bad
//    requests (unknown family, a piece with no operation started or for a delete, a stream that
//    ends without commit) are INVALID_ARGUMENT; a batch over max_write_batch_bytes is
//    RESOURCE_EXHAUSTED.
//  - Read: per key, one message (found=false, last_piece) or its pieces in order, key_index set
//    on every piece, last_piece on the last; keys in request order.
//  - Scan: per entry, the key on its first piece only; last_piece on the last.
#ifndef KLS_SERVICES_STORE_STORE_SERVICE_H_
#define KLS_SERVICES_STORE_STORE_SERVICE_H_

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <cstddef>
#include <memory>

#include "kls/v1/store.grpc.pb.h"
#include "services/store/shard.h"

namespace kls::store {

namespace internal {
class IoPool;
}  // namespace internal

struct StateStoreServiceOptions {
  int io_threads = 4;  // shard calls run here (RocksDB I/O), never in reactor callbacks
  size_t max_write_batch_bytes = size_t{1} << 30;  // keys + values of one Write call
  size_t read_page_bytes = size_t{8} << 20;        // values fetched from the shard per step
};

// Thread-safe (gRPC calls it from any thread). `shard` is not owned and must outlive the
// service; destroy the service only after the grpc::Server serving it has shut down (Shutdown
// waits for every call, and so for the I/O pool's work on them).
class StateStoreService final : public kls::v1::StateStore::CallbackService {
 public:
  StateStoreService(Shard* shard, const StateStoreServiceOptions& options);
  ~StateStoreService() override;
  StateStoreService(const StateStoreService&) = delete;
  StateStoreService& operator=(const StateStoreService&) = delete;

  grpc::ServerReadReactor<kls::v1::WriteRequest>* Write(grpc::CallbackServerContext* context,
                                                        kls::v1::WriteResponse* response) override;
  grpc::ServerWriteReactor<kls::v1::ReadResponse>* Read(
      grpc::CallbackServerContext* context, const kls::v1::ReadRequest* request) override;
  grpc::ServerWriteReactor<kls::v1::ScanResponse>* Scan(
      grpc::CallbackServerContext* context, const kls::v1::ScanRequest* request) override;

 private:
  Shard* shard_;
  StateStoreServiceOptions options_;
  std::unique_ptr<internal::IoPool> pool_;
};

}  // namespace kls::store

#endif  // KLS_SERVICES_STORE_STORE_SERVICE_H_
