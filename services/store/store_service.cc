#include "services/store/store_service.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "services/common/grpc_status.h"

namespace kls::store {
namespace internal {

// A fixed set of threads running queued tasks in FIFO order. Thread-safe. The destructor runs
// the tasks still queued, then joins.
class IoPool {
 public:
  explicit IoPool(int num_threads) {
    for (int i = 0; i < std::max(1, num_threads); ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~IoPool() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (std::thread& thread : threads_) thread.join();
  }
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  void Schedule(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    tasks_.push_back(std::move(task));
  }

 private:
  void Loop() ABSL_LOCKS_EXCLUDED(mu_) {
    while (true) {
      std::function<void()> task;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](IoPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(pool->mu_) {
              return pool->stopping_ || !pool->tasks_.empty();
            },
            this));
        if (tasks_.empty()) return;  // stopping, and drained
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace internal

namespace {

using kls::v1::ReadRequest;
using kls::v1::ReadResponse;
using kls::v1::ScanRequest;
using kls::v1::ScanResponse;
using kls::v1::WriteRequest;
using kls::v1::WriteResponse;
using services::ToGrpcStatus;

bool IsKnownFamily(int family) {
  return family >= kls::v1::COLUMN_FAMILY_SESSIONS && family <= kls::v1::COLUMN_FAMILY_TOKENS;
}

grpc::Status UnknownFamily(int family) {
  return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat("unknown column family ", family)));
}

// Client stream of operations -> one batch, applied on the I/O pool after the commit message.
// gRPC serializes the callbacks of one call; the pool task runs after the last read completes,
// so at most one thread touches the batch at a time.
class WriteReactor final : public grpc::ServerReadReactor<WriteRequest> {
 public:
  WriteReactor(grpc::CallbackServerContext* context, WriteResponse* response, Shard* shard,
               internal::IoPool* pool, size_t max_bytes)
      : context_(context), response_(response), shard_(shard), pool_(pool), max_bytes_(max_bytes) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client half-closed (or went away) without committing: nothing is applied.
      Finish(
          ToGrpcStatus(absl::InvalidArgumentError("Write stream ended without a commit message")));
      return;
    }
    absl::Status status = Absorb();
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    if (!request_.commit()) {
      StartRead(&request_);
      return;
    }
    batch_.sync = request_.sync();
    if (request_.has_expected_record_version()) {
      batch_.expected_record_version = request_.expected_record_version();
    }
    batch_.expect_no_record = request_.expect_no_record();
    pool_->Schedule([this] { Apply(); });
  }

  void OnDone() override { delete this; }

 private:
  // Adds the message in request_ to the batch.
  absl::Status Absorb() {
    WriteRequest& request = request_;
    if (!request.commit() &&
        (request.sync() || request.has_expected_record_version() || request.expect_no_record())) {
      return absl::InvalidArgumentError(
          "sync, expected_record_version and expect_no_record belong on the commit message");
    }
    if (request.family() != kls::v1::COLUMN_FAMILY_UNSPECIFIED) {
      if (!IsKnownFamily(request.family())) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown column family ", static_cast<int>(request.family())));
      }
      if (request.key().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("operation ", batch_.ops.size(), " has an empty key"));
      }
      if (request.is_delete() && !request.value_piece().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("operation ", batch_.ops.size(), " is a delete with a value piece"));
      }
      WriteOp& op = batch_.ops.emplace_back();
      op.family = request.family();
      op.key = std::move(*request.mutable_key());
      op.is_delete = request.is_delete();
      op.value = std::move(*request.mutable_value_piece());  // the first piece: no copy
      bytes_ += op.key.size() + op.value.size();
    } else {
      if (!request.key().empty() || request.is_delete()) {
        return absl::InvalidArgumentError(
            "a key or is_delete without a family (a continuation carries only a value piece)");
      }
      if (!request.value_piece().empty()) {
        if (batch_.ops.empty()) {
          return absl::InvalidArgumentError("value piece without a started operation");
        }
        WriteOp& op = batch_.ops.back();
        if (op.is_delete) {
          return absl::InvalidArgumentError(absl::StrCat(
              "value piece for operation ", batch_.ops.size() - 1, ", which is a delete"));
        }
        op.value.append(request.value_piece());
        bytes_ += request.value_piece().size();
      }
    }
    if (bytes_ > max_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "Write batch exceeds ", max_bytes_, " bytes at operation ", batch_.ops.size() - 1));
    }
    return absl::OkStatus();
  }

  // On the I/O pool.
  void Apply() {
    if (context_->IsCancelled()) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "Write cancelled before it was applied"));
      return;
    }
    absl::Status status = shard_->Write(batch_);
    if (status.ok()) {
      response_->set_operations(batch_.ops.size());
      response_->set_bytes(bytes_);
    }
    batch_ = WriteBatchSpec();  // free the values before the call winds down
    Finish(ToGrpcStatus(status));
  }

  grpc::CallbackServerContext* context_;
  WriteResponse* response_;
  Shard* shard_;
  internal::IoPool* pool_;
  size_t max_bytes_;
  WriteRequest request_;
  WriteBatchSpec batch_;
  uint64_t bytes_ = 0;
};

// Server-streaming base: alternates between fetching a page on the I/O pool and streaming it,
// one StartWrite outstanding. Exactly one of {a fetch, a write} is in flight at any time, and
// each hands over to the next through gRPC or the pool, so the members need no lock.
template <typename Response>
class PagedWriteReactor : public grpc::ServerWriteReactor<Response> {
 public:
  PagedWriteReactor(grpc::CallbackServerContext* context, Shard* shard, internal::IoPool* pool,
                    size_t page_bytes)
      : context_(context), shard_(shard), pool_(pool), page_bytes_(page_bytes) {}

  void OnWriteDone(bool ok) override {
    if (!ok) {
      this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client stream closed"));
      return;
    }
    Continue();
  }

  void OnDone() override { delete this; }

 protected:
  // Fetches the next page from the shard (on the pool). Error: finish with it. Returns whether
  // a later page may follow.
  virtual absl::StatusOr<bool> FetchPage() = 0;
  // Fills response_ with the next message of the current page; false when the page is drained.
  virtual bool NextMessage() = 0;

  void ScheduleFetch() {
    pool_->Schedule([this] {
      if (context_->IsCancelled()) {
        this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled"));
        return;
      }
      absl::StatusOr<bool> more = FetchPage();
      if (!more.ok()) {
        this->Finish(ToGrpcStatus(more.status()));
        return;
      }
      more_pages_ = *more;
      Continue();
    });
  }

  // Writes the next message, or fetches the next page, or finishes.
  void Continue() {
    if (NextMessage()) {
      this->StartWrite(&response_);
    } else if (more_pages_) {
      ScheduleFetch();
    } else {
      this->Finish(grpc::Status::OK);
    }
  }

  grpc::CallbackServerContext* context_;
  Shard* shard_;
  internal::IoPool* pool_;
  size_t page_bytes_;
  Response response_;
  bool more_pages_ = false;
};

// Copies the next piece of `value` (from `offset`) into `piece`; moves the whole value when it
// is one piece. Returns whether it was the last piece.
bool TakePiece(std::string& value, size_t& offset, std::string* piece) {
  if (offset == 0 && value.size() <= kMaxValuePieceBytes) {
    *piece = std::move(value);
    value.clear();
    return true;
  }
  const size_t n = std::min(kMaxValuePieceBytes, value.size() - offset);
  piece->assign(value, offset, n);
  offset += n;
  return offset == value.size();
}

class ReadReactor final : public PagedWriteReactor<ReadResponse> {
 public:
  ReadReactor(grpc::CallbackServerContext* context, const ReadRequest* request, Shard* shard,
              internal::IoPool* pool, size_t page_bytes)
      : PagedWriteReactor(context, shard, pool, page_bytes), request_(request) {
    if (!IsKnownFamily(request->family())) {
      Finish(UnknownFamily(request->family()));
      return;
    }
    if (request->keys().empty()) {
      Finish(grpc::Status::OK);
      return;
    }
    ScheduleFetch();
  }

 private:
  absl::StatusOr<bool> FetchPage() override {
    page_.clear();
    page_begin_ = next_key_;
    piece_offset_ = 0;
    page_pos_ = 0;
    size_t bytes = 0;
    const int num_keys = request_->keys_size();
    // One key per shard call, so a page stops near page_bytes whatever the value sizes.
    while (next_key_ < num_keys && (page_.empty() || bytes < page_bytes_)) {
      absl::StatusOr<std::vector<std::optional<std::string>>> values =
          shard_->Read(request_->family(), {request_->keys(next_key_)});
      if (!values.ok()) return values.status();
      if (values->size() != 1) {
        return absl::InternalError(
            absl::StrCat("shard returned ", values->size(), " values for 1 key"));
      }
      if ((*values)[0].has_value()) bytes += (*values)[0]->size();
      page_.push_back(std::move((*values)[0]));
      ++next_key_;
    }
    return next_key_ < num_keys;
  }

  bool NextMessage() override {
    if (page_pos_ >= page_.size()) return false;
    response_.Clear();
    response_.set_key_index(static_cast<uint32_t>(page_begin_ + page_pos_));
    std::optional<std::string>& value = page_[page_pos_];
    bool last = true;
    if (value.has_value()) {
      response_.set_found(true);
      last = TakePiece(*value, piece_offset_, response_.mutable_value_piece());
    }
    response_.set_last_piece(last);
    if (last) {
      value.reset();
      ++page_pos_;
      piece_offset_ = 0;
    }
    return true;
  }

  const ReadRequest* request_;  // owned by gRPC, valid until OnDone
  int next_key_ = 0;            // first key of the next page
  size_t page_begin_ = 0;       // request index of page_[0]
  std::vector<std::optional<std::string>> page_;
  size_t page_pos_ = 0;      // entry of page_ being streamed
  size_t piece_offset_ = 0;  // bytes of it already sent
};

class ScanReactor final : public PagedWriteReactor<ScanResponse> {
 public:
  static constexpr uint32_t kPageKeys = 1024;

  ScanReactor(grpc::CallbackServerContext* context, const ScanRequest* request, Shard* shard,
              internal::IoPool* pool, size_t page_bytes)
      : PagedWriteReactor(context, shard, pool, page_bytes),
        request_(request),
        start_after_(request->start_after()),
        remaining_(request->limit()) {
    if (!IsKnownFamily(request->family())) {
      Finish(UnknownFamily(request->family()));
      return;
    }
    ScheduleFetch();
  }

 private:
  absl::StatusOr<bool> FetchPage() override {
    page_.clear();
    page_pos_ = 0;
    piece_offset_ = 0;
    const uint32_t want =
        request_->limit() == 0 ? kPageKeys : std::min<uint32_t>(kPageKeys, remaining_);
    size_t bytes = 0;
    bool full = false;  // stopped on the byte budget
    absl::Status status =
        shard_->Scan(request_->family(), request_->prefix(), start_after_, want,
                     request_->keys_only(), [&](std::string_view key, std::string_view value) {
                       page_.emplace_back(std::string(key), std::string(value));
                       bytes += key.size() + value.size();
                       full = bytes >= page_bytes_;
                       return !full;
                     });
    if (!status.ok()) return status;
    if (page_.empty()) return false;
    start_after_ = page_.back().first;
    if (request_->limit() != 0) remaining_ -= static_cast<uint32_t>(page_.size());
    const bool scan_exhausted = !full && page_.size() < want;
    return !scan_exhausted && (request_->limit() == 0 || remaining_ > 0);
  }

  bool NextMessage() override {
    if (page_pos_ >= page_.size()) return false;
    response_.Clear();
    auto& [key, value] = page_[page_pos_];
    if (piece_offset_ == 0) *response_.mutable_key() = std::move(key);
    const bool last = TakePiece(value, piece_offset_, response_.mutable_value_piece());
    response_.set_last_piece(last);
    if (last) {
      value = std::string();
      ++page_pos_;
      piece_offset_ = 0;
    }
    return true;
  }

  const ScanRequest* request_;  // owned by gRPC, valid until OnDone
  std::string start_after_;     // the last key streamed (or the request's start_after)
  uint32_t remaining_;          // keys still allowed by the request's limit (when limit != 0)
  std::vector<std::pair<std::string, std::string>> page_;
  size_t page_pos_ = 0;
  size_t piece_offset_ = 0;
};

}  // namespace

StateStoreService::StateStoreService(Shard* shard, const StateStoreServiceOptions& options)
    : shard_(shard),
      options_(options),
      pool_(std::make_unique<internal::IoPool>(options.io_threads)) {}

StateStoreService::~StateStoreService() = default;

grpc::ServerReadReactor<WriteRequest>* StateStoreService::Write(
    grpc::CallbackServerContext* context, WriteResponse* response) {
  return new WriteReactor(context, response, shard_, pool_.get(), options_.max_write_batch_bytes);
}

grpc::ServerWriteReactor<ReadResponse>* StateStoreService::Read(
    grpc::CallbackServerContext* context, const ReadRequest* request) {
  return new ReadReactor(context, request, shard_, pool_.get(), options_.read_page_bytes);
}

grpc::ServerWriteReactor<ScanResponse>* StateStoreService::Scan(
    grpc::CallbackServerContext* context, const ScanRequest* request) {
  return new ScanReactor(context, request, shard_, pool_.get(), options_.read_page_bytes);
}

}  // namespace kls::store
