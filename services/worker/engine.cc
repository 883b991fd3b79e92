#include "services/worker/engine.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <list>
#include <optional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/state/snapshot.h"
#include "engine/tokenizer/tokenizer.h"
#include "services/worker/task_pool.h"

namespace kls::worker {
namespace {

using engine::SessionState;
using kls::v1::SessionRecord;

constexpr uint32_t kRecordFormatVersion = 1;

// Bounds on a session's metadata as a whole (ValidateGenerateRequest bounds each turn's): the
// record carrying it is read before and rewritten at every turn, so it must not grow without end.
constexpr int64_t kMaxSessionMetadataEntries = 128;
constexpr int64_t kMaxSessionMetadataBytes = int64_t{64} << 10;  // keys + values

using MetadataMap = google::protobuf::Map<std::string, std::string>;

struct MetadataSize {
  int64_t entries = 0;
  int64_t bytes = 0;  // keys + values
};

MetadataSize SizeOf(const MetadataMap& metadata) {
  MetadataSize size;
  for (const auto& [key, value] : metadata) {
    ++size.entries;
    size.bytes += key.size() + value.size();
  }
  return size;
}

// The size of `metadata` once `changes` are merged (an empty value removes its key).
MetadataSize MergedSize(const MetadataMap& metadata,
                        const std::vector<std::pair<std::string, std::string>>& changes) {
  MetadataSize size = SizeOf(metadata);
  for (const auto& [key, value] : changes) {
    if (auto it = metadata.find(key); it != metadata.end()) {
      --size.entries;
      size.bytes -= key.size() + it->second.size();
    }
    if (!value.empty()) {
      ++size.entries;
      size.bytes += key.size() + value.size();
    }
  }
  return size;
}

// OK, or INVALID_ARGUMENT naming the limits when a session's metadata goes from `before` to
// `after` and `after` is beyond a bound it grew towards. A change that does not grow it is fine,
// so a session over the bounds (made before they existed) keeps working and can shrink. `what`
// names the operation.
absl::Status CheckSessionMetadata(MetadataSize before, MetadataSize after,
                                  const std::string& session_id, const char* what) {
  if ((after.entries <= kMaxSessionMetadataEntries || after.entries <= before.entries) &&
      (after.bytes <= kMaxSessionMetadataBytes || after.bytes <= before.bytes)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(what, " would leave session ", session_id, " with ", after.entries,
                   " metadata entries of ", after.bytes, " bytes; a session holds at most ",
                   kMaxSessionMetadataEntries, " entries and ", kMaxSessionMetadataBytes,
                   " bytes (keys + values) of metadata (an empty value removes a key)"));
}

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

double MsBetween(absl::Time from, absl::Time to) {
  return from == absl::InfinitePast() || to == absl::InfinitePast()
             ? 0.0
             : absl::ToDoubleMilliseconds(to - from);
}

// 16 bytes, high word first, big-endian (sorts like the hex form).
std::string HashBytes(const Hash128& h) {
  std::string key(16, '\0');
  for (int i = 0; i < 8; ++i) {
    key[i] = static_cast<char>(h.high >> (56 - 8 * i));
    key[8 + i] = static_cast<char>(h.low >> (56 - 8 * i));
  }
  return key;
}

std::string HexOf(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

// Length of the longest suffix of `text` that is a proper prefix of a stop string: it may still
// grow into one, so it is held back from the stream.
size_t HeldBackSuffix(std::string_view text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& stop : stops) {
    for (size_t len = std::min(stop.size() - 1, text.size()); len > hold; --len) {
      if (text.substr(text.size() - len) == std::string_view(stop).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

// The earliest occurrence of any stop string in text[from, ...), or npos.
size_t FindStop(std::string_view text, size_t from, const std::vector<std::string>& stops) {
  size_t best = std::string_view::npos;
  for (const std::string& stop : stops) {
    const size_t at = text.find(stop, from);
    if (at < best) best = at;
  }
  return best;
}

struct HotSession {
  std::string key;
  SessionRecord record;          // the latest version (may be ahead of the store)
  std::vector<int32_t> history;  // record.num_history_tokens() ids: fed, then pending
  // history[0, record.num_fed_tokens()) fed; held by the backend. Null only between a
  // restore on the I/O pool and its import on the engine thread.
  std::unique_ptr<engine::BackendState> state;
  // The store: `durable` is what it is known to hold; `base` what it will hold once every
  // scheduled commit has landed (the expected version of the next commit).
  std::optional<SessionRecord> durable;
  std::optional<SessionRecord> base;
  std::vector<Hash128> full_block_hashes;  // chained hashes of the full blocks of fed tokens
  int durable_full_blocks = 0;             // full blocks known to be in the store
  bool writeback_scheduled = false;
  // Backoff of write-backs after a failure, so a store outage is not hammered every step.
  absl::Time next_writeback = absl::InfinitePast();
  absl::Duration writeback_backoff = absl::Milliseconds(100);
  uint64_t generation = 0;  // distinguishes this copy from later copies of the same session
  std::list<HotSession*>::iterator lru;

  bool dirty() const { return !base.has_value() || base->version() != record.version(); }
  // Whether the store's `stored` record is one this copy continues (it was written by us and
  // nobody committed after us).
  bool Continues(const SessionRecord& stored) const {
    if (!durable.has_value()) return false;
    const uint64_t newest = base.has_value() ? base->version() : durable->version();
    return stored.version() >= durable->version() && stored.version() <= newest;
  }
};

struct ActiveTurn {
  TurnParams params;
  std::shared_ptr<TurnSink> sink;
  std::string key;
  HotSession* session = nullptr;
  // Rollback point: the backend's state checkpoint, the history length and the record.
  std::unique_ptr<engine::StateCheckpoint> checkpoint;
  size_t history_checkpoint = 0;
  SessionRecord record_checkpoint;
  std::optional<SessionRecord> base_checkpoint;
  // The prompt: the session's pending tokens, then the new input.
  std::vector<int32_t> prompt;
  size_t prefilled = 0;
  std::vector<int32_t> generated;
  bool decoding = false;
  std::unique_ptr<engine::StreamingDecoder> decoder;
  std::string text;      // all text so far (stop strings are searched here)
  size_t text_sent = 0;  // bytes of `text` already streamed
  kls::v1::FinishReason finish = kls::v1::FINISH_REASON_UNSPECIFIED;
  bool stop_string_hit = false;  // the text was cut at a stop string
  kls::v1::GenerateResponse final;
  absl::Time admit_time = absl::InfinitePast(), first_token_time = absl::InfinitePast();
  double restore_ms = 0;
  bool restored = false, rebuilt = false;
};

kls::v1::Session SessionView(const SessionRecord& r) {
  kls::v1::Session s;
  s.set_session_id(r.session_id());
  s.set_version(r.version());
  s.set_num_tokens(r.num_history_tokens());
  s.set_create_time_ms(r.create_time_ms());
  s.set_update_time_ms(r.update_time_ms());
  if (r.ttl_seconds() > 0) s.set_expire_time_ms(r.update_time_ms() + r.ttl_seconds() * 1000);
  *s.mutable_metadata() = r.metadata();
  s.set_parent_session_id(r.parent_session_id());
  s.set_parent_version(r.parent_version());
  s.set_model_fingerprint(HexOf(r.model_fingerprint()));
  return s;
}

// A restored session, built on an I/O thread.
struct Restored {
  std::unique_ptr<HotSession> session;  // without its state, which the engine thread imports
  SessionState host_state;
  bool rebuilt = false;
};

}  // namespace

class Engine::Impl {
 public:
  Impl(const EngineOptions& options, std::shared_ptr<const engine::LoadedModel> model,
       std::unique_ptr<engine::Backend> backend, store::SessionStore* store)
      : options_(options),
        model_(std::move(model)),
        config_(model_->weights->config),
        fingerprint_(model_->weights->fingerprint),
        fingerprint_bytes_(HashBytes(fingerprint_)),
        backend_(std::move(backend)),
        store_(store),
        io_(options.io_threads),
        commits_(1) {
    thread_ = std::thread([this] { Loop(); });
  }

  ~Impl() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }

  const EngineOptions& options() const { return options_; }
  const engine::ModelConfig& config() const { return config_; }
  const engine::Tokenizer& tokenizer() const { return *model_->tokenizer; }

  // ---- Entry points (any thread): they only post events. ------------------------------------

  void Generate(TurnParams params, std::shared_ptr<TurnSink> sink) {
    auto turn = std::make_unique<ActiveTurn>();
    turn->key = Key(params.tenant, params.session_id);
    turn->params = std::move(params);
    turn->sink = std::move(sink);
    Post([this, turn = std::move(turn)]() mutable { StartTurn(std::move(turn)); });
  }

  void CreateSession(std::string tenant, kls::v1::CreateSessionRequest request,
                     std::vector<int32_t> system_tokens, Callback<kls::v1::Session> done) {
    Post([this, tenant = std::move(tenant), request = std::move(request),
          system_tokens = std::move(system_tokens), done = std::move(done)]() mutable {
      if (draining_) return done(absl::UnavailableError("worker is draining"));
      const std::string key = Key(tenant, request.session_id());
      // Only an operation in flight blocks the id; the store's create check is authoritative (a
      // stale hot copy of a deleted or expired session is replaced on success).
      if (busy_.contains(key)) {
        return done(absl::AlreadyExistsError(
            absl::StrCat("session ", request.session_id(), " already exists")));
      }
      if (absl::Status s = CheckSessionMetadata({}, SizeOf(request.metadata()),
                                                request.session_id(), "the metadata");
          !s.ok()) {
        return done(s);
      }
      auto session = std::make_unique<HotSession>();
      session->key = key;
      SessionRecord& r = session->record;
      r.set_format_version(kRecordFormatVersion);
      r.set_tenant(tenant);
      r.set_session_id(request.session_id());
      r.set_model_fingerprint(fingerprint_bytes_);
      r.set_version(0);
      r.set_num_history_tokens(system_tokens.size());
      r.set_create_time_ms(NowMs());
      r.set_update_time_ms(r.create_time_ms());
      r.set_ttl_seconds(request.ttl_seconds());
      *r.mutable_metadata() = request.metadata();
      r.add_version_history_tokens(system_tokens.size());
      session->history = std::move(system_tokens);
      absl::StatusOr<std::unique_ptr<engine::BackendState>> state =
          WithRoom([&] { return backend_->NewState(); });
      if (!state.ok()) return done(state.status());
      session->state = *std::move(state);
      CommitNewSession(std::move(session), std::move(done));
    });
  }

  void GetSession(std::string tenant, kls::v1::GetSessionRequest request,
                  Callback<kls::v1::Session> done) {
    Post([this, tenant = std::move(tenant), request = std::move(request),
          done = std::move(done)]() mutable {
      io_.Schedule([this, tenant = std::move(tenant), request = std::move(request),
                    done = std::move(done)]() mutable {
        absl::StatusOr<SessionRecord> stored = store_->GetRecord(tenant, request.session_id());
        std::vector<int32_t> tokens;
        if (stored.ok() && request.include_history()) {
          absl::StatusOr<std::vector<int32_t>> t = store_->GetTokens(request.session_id());
          if (t.ok()) tokens = *std::move(t);
        }
        Post([this, key = Key(tenant, request.session_id()), request = std::move(request),
              stored = std::move(stored), tokens = std::move(tokens),
              done = std::move(done)]() mutable {
          if (!stored.ok()) {
            if (absl::IsNotFound(stored.status())) DropIfIdle(key);
            return done(stored.status());
          }
          SessionRecord record = *std::move(stored);
          HotSession* hot = Find(key);
          // The hot copy may be ahead of the store (NONE / ASYNC turns); while a turn or its SYNC
          // commit is in flight it may still roll back, so the durable version is reported then.
          if (hot != nullptr && hot->Continues(record)) {
            const bool settled = !busy_.contains(key);
            record = settled ? hot->record : *hot->durable;
            if (request.include_history()) {
              tokens.assign(hot->history.begin(),
                            hot->history.begin() + record.num_history_tokens());
            }
          }
          kls::v1::Session view = SessionView(record);
          if (!request.include_history() && !request.include_turns()) {
            return done(std::move(view));
          }
          std::vector<kls::v1::TurnRecord> turns;
          if (request.include_turns()) {
            turns.assign(record.recent_turns().begin(), record.recent_turns().end());
          }
          // Decoding a long history is not the engine thread's work.
          io_.Schedule([this, view = std::move(view), tokens = std::move(tokens),
                        turns = std::move(turns), history = request.include_history(),
                        done = std::move(done)]() mutable {
            if (history) {
              view.mutable_history_tokens()->Assign(tokens.begin(), tokens.end());
              view.set_history_text(DecodeForDisplay(tokens));
            }
            for (const kls::v1::TurnRecord& turn : turns) {
              kls::v1::TurnResult* result = view.add_recent_turns();
              result->set_request_id(turn.request_id());
              result->set_version(turn.version());
              result->set_text(TurnText(turn));
              result->set_finish_reason(static_cast<kls::v1::FinishReason>(turn.finish_reason()));
              result->set_prompt_tokens(turn.prompt_tokens());
              result->set_completion_tokens(turn.token_ids_size());
            }
            done(std::move(view));
          });
        });
      });
    });
  }

  void ListSessions(std::string tenant, kls::v1::ListSessionsRequest request,
                    Callback<kls::v1::ListSessionsResponse> done) {
    io_.Schedule([this, tenant = std::move(tenant), request = std::move(request),
                  done = std::move(done)]() mutable {
      const int page_size = request.page_size() == 0 ? 100 : request.page_size();
      if (page_size < 1 || page_size > 1000) {
        return done(absl::InvalidArgumentError(
            absl::StrCat("page_size must be in [1, 1000], got ", request.page_size())));
      }
      absl::StatusOr<store::ListPage> page =
          store_->ListSessions(tenant, page_size, request.page_token());
      if (!page.ok()) return done(page.status());
      kls::v1::ListSessionsResponse response;
      for (const SessionRecord& r : page->records) *response.add_sessions() = SessionView(r);
      response.set_next_page_token(page->next_page_token);
      done(std::move(response));
    });
  }

  void DeleteSession(std::string tenant, kls::v1::DeleteSessionRequest request,
                     Callback<kls::v1::DeleteSessionResponse> done) {
    Post([this, tenant = std::move(tenant), request = std::move(request),
          done = std::move(done)]() mutable {
      const std::string key = Key(tenant, request.session_id());
      if (busy_.contains(key)) return done(Busy(request.session_id()));
      busy_.insert(key);
      io_.Schedule([this, key, tenant = std::move(tenant), request = std::move(request),
                    done = std::move(done)]() mutable {
        absl::Status status = store_->DeleteSession(tenant, request.session_id());
        Post([this, key, status, done = std::move(done)]() mutable {
          busy_.erase(key);
          if (status.ok() || absl::IsNotFound(status)) DropIfIdle(key);
          if (!status.ok()) return done(status);
          done(kls::v1::DeleteSessionResponse());
        });
      });
    });
  }

  void ForkSession(std::string tenant, kls::v1::ForkSessionRequest request,
                   Callback<kls::v1::Session> done) {
    Post([this, tenant = std::move(tenant), request = std::move(request),
          done = std::move(done)]() mutable {
      if (draining_) return done(absl::UnavailableError("worker is draining"));
      const std::string source_key = Key(tenant, request.session_id());
      const std::string child_key = Key(tenant, request.new_session_id());
      if (busy_.contains(source_key)) return done(Busy(request.session_id()));
      if (busy_.contains(child_key)) {
        return done(absl::AlreadyExistsError(
            absl::StrCat("session ", request.new_session_id(), " already exists")));
      }
      busy_.insert(source_key);
      busy_.insert(child_key);
      auto finish = [this, source_key, child_key,
                     done = std::move(done)](absl::StatusOr<kls::v1::Session> result) mutable {
        busy_.erase(source_key);
        busy_.erase(child_key);
        done(std::move(result));
      };
      const std::string source_id = request.session_id();  // `request` moves below
      WithSession(tenant, source_id,
                  [this, tenant, request = std::move(request), finish = std::move(finish)](
                      absl::StatusOr<HotSession*> source, double, bool) mutable {
                    if (!source.ok()) return finish(source.status());
                    Fork(tenant, **source, request, std::move(finish));
                  });
    });
  }

  kls::v1::Load GetLoad() const {
    kls::v1::Load load;
    load.set_active_turns(active_count_.load());
    load.set_queued_turns(queued_count_.load());
    load.set_hot_sessions(hot_count_.load());
    load.set_hot_bytes(hot_bytes_.load());
    load.set_budget_bytes(options_.hot_budget_bytes);
    load.set_draining(draining_flag_.load());
    load.set_model_fingerprint(fingerprint_.ToHex());
    load.set_turns_total(turns_.load());
    load.set_restores_total(restores_.load());
    load.set_rebuilds_total(rebuilds_.load());
    load.set_evictions_total(evictions_.load());
    load.set_commits_total(commits_ok_.load());
    load.set_commit_failures_total(commit_failures_.load());
    return load;
  }

  absl::Status Drain(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    draining_flag_ = true;
    Post([this] { draining_ = true; });
    // Running turns and their commits finish; then every hot session whose latest version is not
    // durable is written back, again and again until it is or the deadline passes.
    auto wait_idle = [&]() -> bool {
      while (absl::Now() < deadline) {
        if (idle_.load() && commits_.Pending() == 0 && io_.Pending() == 0) return true;
        absl::SleepFor(absl::Milliseconds(5));
      }
      return false;
    };
    if (!wait_idle()) return absl::DeadlineExceededError("drain: turns still running");
    int not_durable = -1;
    while (absl::Now() < deadline) {
      auto count = std::make_shared<std::atomic<int>>(-1);
      auto lost = std::make_shared<std::atomic<bool>>(false);
      Post([this, count, lost] {
        int n = 0;
        // A failed backend cannot export state: what is not durable now is lost.
        *lost = !backend_failure_.ok();
        for (auto& [key, session] : hot_) {
          if (session->durable.has_value() &&
              session->durable->version() == session->record.version()) {
            continue;
          }
          ++n;
          if (*lost) continue;
          session->next_writeback = absl::InfinitePast();  // no backoff while draining
          ScheduleWriteback(*session);
        }
        *count = n;
      });
      while (count->load() < 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
      not_durable = count->load();
      if (not_durable == 0) return absl::OkStatus();
      if (lost->load()) {
        return absl::DataLossError(absl::StrCat(
            "drain: the backend failed; the uncommitted turns of ", not_durable,
            " hot sessions are lost (their last committed versions are in the store)"));
      }
      if (!wait_idle()) break;
      absl::SleepFor(absl::Milliseconds(20));  // a store that refused is retried, not hammered
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "drain: ", not_durable, " hot sessions could not be written back before the deadline"));
  }

 private:
  // The text of `ids` with special tokens spelled out; bytes that do not form valid UTF-8 (a
  // split character) become U+FFFD, so the text always fits a proto string field.
  std::string DecodeForDisplay(const std::vector<int32_t>& ids) const {
    engine::StreamingDecoder decoder(tokenizer(), /*skip_special=*/false);
    std::string text;
    for (int32_t id : ids) {
      absl::StatusOr<std::string> piece = decoder.Push(id);
      if (piece.ok()) text += *piece;
    }
    return text + decoder.Flush();
  }

  // The text a recorded turn streamed: special tokens per its request, a final special stop
  // token dropped (Emit gives it no text).
  std::string TurnText(const kls::v1::TurnRecord& done) const {
    std::vector<int32_t> ids(done.token_ids().begin(), done.token_ids().end());
    if (done.finish_reason() == kls::v1::FINISH_REASON_STOP && !ids.empty() &&
        tokenizer().IsSpecial(ids.back())) {
      ids.pop_back();
    }
    engine::StreamingDecoder decoder(tokenizer(), !done.special_tokens_in_text());
    std::string text;
    for (int32_t id : ids) {
      absl::StatusOr<std::string> piece = decoder.Push(id);
      if (piece.ok()) text += *piece;
    }
    return text + decoder.Flush();
  }

  static std::string Key(const std::string& tenant, const std::string& session_id) {
    return absl::StrCat(tenant, "/", session_id);
  }

  static absl::Status Busy(const std::string& session_id) {
    return absl::AbortedError(absl::StrCat(
        "session ", session_id, " has a turn or operation in progress; retry when it ends"));
  }

  void Post(absl::AnyInvocable<void()> event) {
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(event));
  }

  // ---- The engine thread ---------------------------------------------------------------------

  void Loop() {
    std::deque<absl::AnyInvocable<void()>> events;
    while (true) {
      bool stopping;
      {
        absl::MutexLock lock(&mu_);
        if (active_.empty() && waiting_.empty()) {
          mu_.Await(absl::Condition(
              +[](Impl* impl) ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl->mu_) {
                return impl->stop_ || !impl->events_.empty();
              },
              this));
        }
        events.swap(events_);
        stopping = stop_;
      }
      for (auto& event : events) event();
      events.clear();
      if (stopping) {
        // Fail what runs or waits, then keep handling the results the pools still post (so
        // every request gets its answer) until nothing is left.
        draining_ = true;
        FailAllTurns();
        bool quiet;
        {
          absl::MutexLock lock(&mu_);
          quiet = events_.empty() && io_.Pending() == 0 && commits_.Pending() == 0;
        }
        if (quiet) break;
        absl::SleepFor(absl::Milliseconds(1));
        continue;
      }
      Admit();
      if (!active_.empty()) Step();
      int64_t hot_bytes = 0;
      for (auto& [key, session] : hot_) hot_bytes += session->state->ByteSize();
      hot_bytes = Evict(hot_bytes);
      PublishLoad(hot_bytes);
    }
    FailAllTurns();
  }

  void FailAllTurns() {
    const absl::Status status = absl::UnavailableError("worker shutting down; turn not committed");
    for (auto& turn : active_) {
      Rollback(*turn);
      busy_.erase(turn->key);
      turn->sink->OnDone(status, {});
    }
    active_.clear();
    for (auto& turn : waiting_) {
      Rollback(*turn);
      busy_.erase(turn->key);
      turn->sink->OnDone(status, {});
    }
    waiting_.clear();
  }

  void PublishLoad(int64_t hot_bytes) {
    hot_bytes_ = static_cast<uint64_t>(hot_bytes);
    hot_count_ = static_cast<uint32_t>(hot_.size());
    active_count_ = static_cast<uint32_t>(active_.size());
    queued_count_ = static_cast<uint32_t>(waiting_.size() + preparing_);
    idle_ = active_.empty() && waiting_.empty() && busy_.empty();
  }

  HotSession* Find(const std::string& key) {
    auto it = hot_.find(key);
    return it == hot_.end() ? nullptr : it->second.get();
  }

  void Touch(HotSession& session) { lru_.splice(lru_.begin(), lru_, session.lru); }

  // Drops the least recently used hot session that is idle and durable (nothing to write back),
  // freeing its backend memory. False when there is none.
  bool EvictOneIdle() {
    for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
      HotSession* s = *it;
      if (busy_.contains(s->key) || s->dirty() || !s->durable.has_value() ||
          s->base->version() != s->durable->version()) {
        continue;
      }
      evictions_.fetch_add(1);
      Drop(s->key);
      return true;
    }
    return false;
  }

  // Runs `make` (a backend call) and, while it fails for lack of backend memory (the GPU's state
  // slots or cache pages, which can run out before the hot budget in bytes does), evicts idle
  // sessions and tries again. Dirty sessions are written back by the normal eviction first.
  template <typename F>
  auto WithRoom(F make) -> decltype(make()) {
    auto result = make();
    while (IsResourceExhausted(result) && EvictOneIdle()) result = make();
    return result;
  }
  static bool IsResourceExhausted(const absl::Status& s) { return absl::IsResourceExhausted(s); }
  template <typename T>
  static bool IsResourceExhausted(const absl::StatusOr<T>& s) {
    return absl::IsResourceExhausted(s.status());
  }

  HotSession* Install(std::unique_ptr<HotSession> session) {
    Drop(session->key);
    HotSession* raw = session.get();
    raw->generation = ++generations_;
    lru_.push_front(raw);
    raw->lru = lru_.begin();
    hot_[raw->key] = std::move(session);
    return raw;
  }

  void Drop(const std::string& key) {
    auto it = hot_.find(key);
    if (it == hot_.end()) return;
    lru_.erase(it->second->lru);
    hot_.erase(it);
  }

  void DropIfIdle(const std::string& key) {
    if (!busy_.contains(key)) Drop(key);
  }

  // Runs `then(session, restore_ms, rebuilt)` on the engine thread with the session hot and
  // current: reads the record, checks the model, and restores from the store unless the hot copy
  // continues it. The caller holds busy_ for the key.
  using SessionThen = absl::AnyInvocable<void(absl::StatusOr<HotSession*>, double, bool)>;
  void WithSession(const std::string& tenant, const std::string& session_id, SessionThen then) {
    io_.Schedule([this, tenant, session_id, then = std::move(then)]() mutable {
      absl::StatusOr<SessionRecord> stored = store_->GetRecord(tenant, session_id);
      Post([this, tenant, session_id, stored = std::move(stored),
            then = std::move(then)]() mutable {
        const std::string key = Key(tenant, session_id);
        if (!stored.ok()) {
          if (absl::IsNotFound(stored.status())) Drop(key);
          return then(stored.status(), 0, false);
        }
        if (stored->model_fingerprint() != fingerprint_bytes_) {
          return then(
              absl::FailedPreconditionError(absl::StrCat(
                  "session ", session_id, " was made by model ", HexOf(stored->model_fingerprint()),
                  " but this worker serves model ", fingerprint_.ToHex())),
              0, false);
        }
        if (stored->format_version() != kRecordFormatVersion) {
          return then(
              absl::FailedPreconditionError(absl::StrCat(
                  "session ", session_id, " has record format version ", stored->format_version(),
                  "; this worker reads version ", kRecordFormatVersion)),
              0, false);
        }
        HotSession* hot = Find(key);
        if (hot != nullptr && hot->Continues(*stored)) {
          Touch(*hot);
          return then(hot, 0, false);
        }
        Drop(key);  // stale: another worker committed after this copy
        const absl::Time start = absl::Now();
        io_.Schedule(
            [this, key, stored = *std::move(stored), start, then = std::move(then)]() mutable {
              absl::StatusOr<Restored> restored = Restore(key, std::move(stored));
              Post([this, restored = std::move(restored), start, then = std::move(then)]() mutable {
                if (!restored.ok()) return then(restored.status(), 0, false);
                const bool rebuilt = restored->rebuilt;
                absl::StatusOr<std::unique_ptr<engine::BackendState>> state =
                    WithRoom([&] { return backend_->ImportState(restored->host_state); });
                if (!state.ok()) return then(state.status(), 0, false);
                restored->session->state = *std::move(state);
                restores_.fetch_add(1);
                HotSession* session = Install(std::move(restored->session));
                then(session, MsBetween(start, absl::Now()), rebuilt);
              });
            });
      });
    });
  }

  // I/O thread: loads a session from the store. A state that cannot be read back exactly
  // (missing or corrupt chunk or block) is rebuilt from the token history: the session comes
  // back with an empty state and its whole history pending, which the next turn re-prefills.
  absl::StatusOr<Restored> Restore(const std::string& key, SessionRecord stored) {
    Restored out;
    auto session = std::make_unique<HotSession>();
    session->key = key;
    absl::StatusOr<std::vector<int32_t>> history = store_->GetTokens(stored.session_id());
    if (!history.ok()) {
      // A store outage is the caller's to retry; a lost history cannot be rebuilt.
      if (!absl::IsNotFound(history.status()) && !absl::IsDataLoss(history.status())) {
        return history.status();
      }
      return absl::DataLossError(
          absl::StrCat("session ", stored.session_id(),
                       ": cannot read its token history: ", history.status().message()));
    }
    session->history = *std::move(history);
    if (session->history.size() != stored.num_history_tokens() ||
        stored.num_fed_tokens() > stored.num_history_tokens()) {
      return absl::DataLossError(absl::StrCat(
          "session ", stored.session_id(), ": the token history has ", session->history.size(),
          " tokens but the record says ", stored.num_history_tokens()));
    }
    out.host_state = SessionState(config_);
    const int64_t fed = static_cast<int64_t>(stored.num_fed_tokens());
    absl::Status loaded = absl::OkStatus();
    if (fed > 0) loaded = LoadState(stored, fed, session.get(), &out.host_state);
    // Rebuild only what is lost or corrupt; another model or format, or a store that cannot be
    // reached, fails the turn instead (the latter with UNAVAILABLE, which the router retries).
    if (!loaded.ok() && !absl::IsDataLoss(loaded) && !absl::IsNotFound(loaded)) return loaded;
    if (!loaded.ok()) {
      KLS_LOG(WARNING) << "session " << stored.session_id() << " v" << stored.version()
                       << ": state unreadable (" << loaded.message()
                       << "); rebuilding it from the token history";
      rebuilds_.fetch_add(1);
      out.host_state = SessionState(config_);
      session->full_block_hashes.clear();
      session->record = stored;
      session->record.set_num_fed_tokens(0);
      session->durable_full_blocks = 0;
      out.rebuilt = true;
    } else {
      session->record = stored;
      session->durable_full_blocks = static_cast<int>(fed / engine::kMlaBlockTokens);
    }
    session->durable = stored;
    session->base = stored;
    out.session = std::move(session);
    return out;
  }

  // Decodes the stored state into `state` (fresh, sized for the model) and the block hashes
  // into `session`.
  absl::Status LoadState(const SessionRecord& stored, int64_t fed, HotSession* session,
                         SessionState* state) {
    KLS_ASSIGN_OR_RETURN(
        std::vector<std::string> chunks,
        store_->GetStateChunks(stored.session_id(), stored.version(), stored.state_chunks()));
    KLS_ASSIGN_OR_RETURN(int64_t position,
                         engine::DecodeStateChunks(chunks, config_, fingerprint_, state));
    if (position != fed) {
      return absl::DataLossError(
          absl::StrCat("state chunks hold ", position, " tokens, the record says ", fed));
    }
    const std::span<const int32_t> fed_tokens(session->history.data(), fed);
    std::vector<Hash128> hashes =
        engine::MlaBlockHashes(fingerprint_, engine::SnapshotDType::kFloat32, fed_tokens);
    if (static_cast<int>(hashes.size()) != stored.block_keys_size()) {
      return absl::DataLossError(absl::StrCat("record lists ", stored.block_keys_size(),
                                              " MLA blocks for ", fed, " tokens"));
    }
    std::vector<std::string> keys(stored.block_keys().begin(), stored.block_keys().end());
    for (size_t i = 0; i < hashes.size(); ++i) {
      if (HashBytes(hashes[i]) != keys[i]) {
        return absl::DataLossError(absl::StrCat("MLA block ", i, " key does not match the tokens"));
      }
    }
    if (!keys.empty()) {
      KLS_ASSIGN_OR_RETURN(std::vector<std::string> blocks, store_->GetBlocks(keys));
      for (const std::string& block : blocks) {
        KLS_RETURN_IF_ERROR(engine::DecodeMlaBlock(block, config_, fingerprint_, state));
      }
    }
    state->set_num_tokens(fed);
    if (!state->MatchesConfig(config_)) {
      return absl::DataLossError("restored state does not match the model's shapes");
    }
    hashes.resize(fed / engine::kMlaBlockTokens);  // full blocks only
    session->full_block_hashes = std::move(hashes);
    return absl::OkStatus();
  }

  // ---- Turns ---------------------------------------------------------------------------------

  void StartTurn(std::unique_ptr<ActiveTurn> turn) {
    if (draining_) {
      return turn->sink->OnDone(absl::UnavailableError("worker is draining; turn not started"), {});
    }
    if (!backend_failure_.ok()) {
      return turn->sink->OnDone(absl::UnavailableError(absl::StrCat("worker's backend failed: ",
                                                                    backend_failure_.message())),
                                {});
    }
    if (busy_.contains(turn->key)) {
      return turn->sink->OnDone(Busy(turn->params.session_id), {});
    }
    busy_.insert(turn->key);
    ++preparing_;
    const std::string tenant = turn->params.tenant, session_id = turn->params.session_id;
    WithSession(tenant, session_id,
                [this, turn = std::move(turn)](absl::StatusOr<HotSession*> session,
                                               double restore_ms, bool rebuilt) mutable {
                  --preparing_;
                  if (!session.ok()) return FailTurn(std::move(turn), session.status());
                  turn->restore_ms = restore_ms;
                  turn->restored = restore_ms > 0 || rebuilt;
                  turn->rebuilt = rebuilt;
                  BeginTurn(std::move(turn), *session);
                });
  }

  void FailTurn(std::unique_ptr<ActiveTurn> turn, const absl::Status& status) {
    busy_.erase(turn->key);
    turn->sink->OnDone(status, {});
  }

  void BeginTurn(std::unique_ptr<ActiveTurn> turn, HotSession* session) {
    const TurnParams& p = turn->params;
    // Idempotency: a request_id this session already committed returns its recorded result.
    if (!p.request_id.empty()) {
      for (const kls::v1::TurnRecord& done : session->record.recent_turns()) {
        if (done.request_id() == p.request_id) return Replay(std::move(turn), done);
      }
    }
    if (p.expected_version.has_value() && *p.expected_version != session->record.version()) {
      return FailTurn(std::move(turn),
                      absl::AbortedError(absl::StrCat(
                          "session ", p.session_id, " is at version ", session->record.version(),
                          ", not the expected version ", *p.expected_version)));
    }
    if (absl::Status s = CheckSessionMetadata(SizeOf(session->record.metadata()),
                                              MergedSize(session->record.metadata(), p.metadata),
                                              p.session_id, "the turn's metadata");
        !s.ok()) {
      return FailTurn(std::move(turn), s);
    }
    const uint64_t fed = session->record.num_fed_tokens();
    turn->prompt.assign(session->history.begin() + fed, session->history.end());
    turn->prompt.insert(turn->prompt.end(), p.input.begin(), p.input.end());
    const int64_t context =
        session->state->num_tokens() + static_cast<int64_t>(turn->prompt.size());
    if (context >= config_.model_max_length) {
      return FailTurn(std::move(turn), absl::InvalidArgumentError(absl::StrCat(
                                           "input of ", p.input.size(), " tokens brings session ",
                                           p.session_id, " to ", context,
                                           " tokens, leaving no room to generate within the "
                                           "context limit of ",
                                           config_.model_max_length, " tokens")));
    }
    absl::StatusOr<std::unique_ptr<engine::StateCheckpoint>> checkpoint =
        WithRoom([&] { return backend_->Checkpoint(*session->state); });
    if (!checkpoint.ok()) return FailTurn(std::move(turn), checkpoint.status());
    turn->session = session;
    turn->checkpoint = *std::move(checkpoint);
    turn->history_checkpoint = session->history.size();
    turn->record_checkpoint = session->record;
    turn->base_checkpoint = session->base;
    turn->decoder = std::make_unique<engine::StreamingDecoder>(
        tokenizer(), /*skip_special=*/!p.special_tokens_in_text);
    waiting_.push_back(std::move(turn));
  }

  void Replay(std::unique_ptr<ActiveTurn> turn, const kls::v1::TurnRecord& done) {
    std::vector<int32_t> ids(done.token_ids().begin(), done.token_ids().end());
    turn->sink->OnTokens(ids, TurnText(done));
    kls::v1::GenerateResponse final;
    final.set_session_id(turn->params.session_id);
    final.set_finish_reason(static_cast<kls::v1::FinishReason>(done.finish_reason()));
    final.set_version(done.version());
    final.set_replayed(true);
    final.mutable_usage()->set_prompt_tokens(done.prompt_tokens());
    final.mutable_usage()->set_completion_tokens(done.token_ids_size());
    final.mutable_usage()->set_seed(done.seed());
    busy_.erase(turn->key);
    turn->sink->OnDone(absl::OkStatus(), std::move(final));
  }

  void Admit() {
    while (!waiting_.empty() && static_cast<int>(active_.size()) < options_.max_running_turns) {
      waiting_.front()->admit_time = absl::Now();
      active_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
  }

  void Rollback(ActiveTurn& turn) {
    HotSession& s = *turn.session;
    if (absl::Status status = backend_->Rollback(*turn.checkpoint, s.state.get()); !status.ok()) {
      // Only a broken invariant gets here; the session must not be continued from this state.
      KLS_LOG(ERROR) << "session " << s.record.session_id() << ": rollback failed: " << status;
    }
    s.history.resize(turn.history_checkpoint);
    s.record = turn.record_checkpoint;
    s.base = turn.base_checkpoint;
    s.full_block_hashes.resize(
        std::min(s.full_block_hashes.size(),
                 static_cast<size_t>(turn.checkpoint->num_tokens() / engine::kMlaBlockTokens)));
  }

  // One engine step: every decoding turn feeds its last token, prefilling turns feed chunks up
  // to the step's prefill budget; turns whose prompt is complete sample a token.
  void Step() {
    // Cancellation is checked between steps.
    for (auto it = active_.begin(); it != active_.end();) {
      if ((*it)->sink->IsCancelled()) {
        std::unique_ptr<ActiveTurn> turn = std::move(*it);
        it = active_.erase(it);
        Rollback(*turn);
        const absl::Status cancelled = absl::CancelledError(absl::StrCat(
            "turn cancelled; session left at version ", turn->record_checkpoint.version()));
        FailTurn(std::move(turn), cancelled);
      } else {
        ++it;
      }
    }
    if (active_.empty()) return;

    std::vector<engine::SequenceInput> batch;
    std::vector<ActiveTurn*> owners;
    std::vector<size_t> fed_counts;
    std::vector<bool> samples;
    int budget = options_.step_prefill_tokens;
    for (auto& turn : active_) {
      if (turn->decoding) {
        batch.push_back(
            {std::span<const int32_t>(&turn->generated.back(), 1), turn->session->state.get()});
        fed_counts.push_back(1);
        samples.push_back(true);
      } else {
        const size_t left = turn->prompt.size() - turn->prefilled;
        const size_t n = std::min(left, static_cast<size_t>(std::max(budget, 0)));
        if (n == 0) continue;
        budget -= static_cast<int>(n);
        batch.push_back({std::span<const int32_t>(turn->prompt).subspan(turn->prefilled, n),
                         turn->session->state.get()});
        fed_counts.push_back(n);
        samples.push_back(n == left);
      }
      owners.push_back(turn.get());
    }
    if (batch.empty()) return;
    // Each sequence's next token is drawn by the backend (on the GPU for the CUDA backend) with
    // the counter SampleReference takes: the position of the token being drawn.
    sample_requests_.resize(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      sample_requests_[i].config = owners[i]->params.sampler;
      sample_requests_[i].counter =
          static_cast<uint64_t>(batch[i].state->num_tokens()) + fed_counts[i];
    }
    sampled_.resize(batch.size());
    const absl::Status status =
        WithRoom([&] { return backend_->ForwardSample(batch, sample_requests_, sampled_); });
    if (!status.ok()) {
      KLS_LOG(ERROR) << "forward pass failed for " << batch.size() << " sequences: " << status;
      // A sticky device error ends this worker's service: every turn fails over to another.
      const absl::Status health = backend_->healthy();
      const bool fatal = !health.ok() && backend_failure_.ok();
      if (fatal) backend_failure_ = health;
      const absl::Status reason =
          fatal
              ? absl::UnavailableError(absl::StrCat("worker's backend failed: ", health.message()))
              : status;
      // The failure is reported (NOT_SERVING) before any turn hears of it.
      if (fatal && options_.on_backend_failure) options_.on_backend_failure(health);
      for (ActiveTurn* owner : owners) Abort(owner, reason);
      if (fatal) {
        while (!active_.empty()) Abort(active_.front().get(), reason);
      }
      return;
    }
    std::vector<ActiveTurn*> finished;
    for (size_t i = 0; i < owners.size(); ++i) {
      ActiveTurn& turn = *owners[i];
      if (!turn.decoding) turn.prefilled += fed_counts[i];
      if (!samples[i]) continue;
      const int32_t token = sampled_[i];
      if (token < 0) {
        Abort(&turn, absl::InternalError(absl::StrCat("the logits at position ",
                                                      turn.session->state->num_tokens(),
                                                      " contain NaN or no finite value")));
        continue;
      }
      if (turn.generated.empty()) turn.first_token_time = absl::Now();
      turn.generated.push_back(token);
      turn.decoding = true;
      if (Emit(turn, token)) finished.push_back(&turn);
    }
    for (ActiveTurn* turn : finished) Finish(turn);
  }

  // Streams the token and its text; returns true when the turn is finished.
  bool Emit(ActiveTurn& turn, int32_t token) {
    const TurnParams& p = turn.params;
    const bool stop_token = std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) !=
                            p.stop_token_ids.end();
    const size_t search_from = turn.text.size();
    // A special stop token (e.g. <|im_end|>) ends the turn without text, even when special
    // tokens are spelled out.
    if (!(stop_token && tokenizer().IsSpecial(token))) {
      absl::StatusOr<std::string> piece = turn.decoder->Push(token);
      if (piece.ok()) turn.text += *piece;
    }
    size_t send_end = turn.text.size();
    bool stop_string = false;
    if (!p.stop_strings.empty()) {
      size_t longest = 0;
      for (const std::string& s : p.stop_strings) longest = std::max(longest, s.size());
      const size_t from = search_from >= longest ? search_from - longest + 1 : 0;
      const size_t at = FindStop(turn.text, from, p.stop_strings);
      if (at != std::string::npos) {
        turn.text.resize(at);
        send_end = at;
        stop_string = true;
        turn.stop_string_hit = true;
      } else {
        send_end = turn.text.size() - HeldBackSuffix(turn.text, p.stop_strings);
      }
    }
    std::string text;
    if (send_end > turn.text_sent) {
      text = turn.text.substr(turn.text_sent, send_end - turn.text_sent);
      turn.text_sent = send_end;
    }
    turn.sink->OnTokens(std::span<const int32_t>(&token, 1), std::move(text));
    if (stop_token || stop_string) {
      turn.finish = kls::v1::FINISH_REASON_STOP;
    } else if (static_cast<int>(turn.generated.size()) >= p.max_tokens ||
               turn.session->state->num_tokens() + 1 >= config_.model_max_length) {
      turn.finish = kls::v1::FINISH_REASON_LENGTH;
    } else {
      return false;
    }
    return true;
  }

  std::unique_ptr<ActiveTurn> TakeActive(ActiveTurn* turn) {
    auto it = std::find_if(active_.begin(), active_.end(),
                           [turn](const auto& t) { return t.get() == turn; });
    std::unique_ptr<ActiveTurn> owned = std::move(*it);
    active_.erase(it);
    return owned;
  }

  void Abort(ActiveTurn* turn, const absl::Status& status) {
    std::unique_ptr<ActiveTurn> owned = TakeActive(turn);
    Rollback(*owned);
    FailTurn(std::move(owned), status);
  }

  void Finish(ActiveTurn* raw) {
    std::unique_ptr<ActiveTurn> turn = TakeActive(raw);
    HotSession& s = *turn->session;
    const TurnParams& p = turn->params;
    // Everything generated except the last token is in the state; the last is pending.
    s.history.insert(s.history.end(), p.input.begin(), p.input.end());
    s.history.insert(s.history.end(), turn->generated.begin(), turn->generated.end());
    SessionRecord& r = s.record;
    r.set_version(r.version() + 1);
    r.set_num_fed_tokens(s.state->num_tokens());
    r.set_num_history_tokens(s.history.size());
    r.set_update_time_ms(NowMs());
    r.add_version_history_tokens(s.history.size());
    for (const auto& [key, value] : p.metadata) {
      if (value.empty()) {
        r.mutable_metadata()->erase(key);
      } else {
        (*r.mutable_metadata())[key] = value;
      }
    }
    if (!p.request_id.empty()) {
      kls::v1::TurnRecord* done = r.add_recent_turns();
      done->set_request_id(p.request_id);
      done->set_version(r.version());
      done->mutable_token_ids()->Assign(turn->generated.begin(), turn->generated.end());
      done->set_finish_reason(turn->finish);
      done->set_prompt_tokens(turn->prompt.size());
      done->set_seed(p.sampler.seed);
      done->set_special_tokens_in_text(p.special_tokens_in_text);
      const int excess = r.recent_turns_size() - options_.recent_turns;
      if (excess > 0) r.mutable_recent_turns()->DeleteSubrange(0, excess);
    }
    Touch(s);

    kls::v1::GenerateResponse& final = turn->final;
    final.set_session_id(p.session_id);
    final.set_finish_reason(turn->finish);
    final.set_version(r.version());
    if (!turn->stop_string_hit) turn->text += turn->decoder->Flush();
    if (turn->text.size() > turn->text_sent) final.set_text(turn->text.substr(turn->text_sent));
    kls::v1::Usage* usage = final.mutable_usage();
    usage->set_prompt_tokens(turn->prompt.size());
    usage->set_completion_tokens(turn->generated.size());
    usage->set_context_tokens(s.history.size());
    usage->set_seed(p.sampler.seed);
    const absl::Time now = absl::Now();
    kls::v1::Timings* t = final.mutable_timings();
    t->set_queue_ms(MsBetween(p.enqueue_time, turn->admit_time));
    t->set_restore_ms(turn->restore_ms);
    t->set_ttft_ms(MsBetween(p.enqueue_time, turn->first_token_time));
    t->set_decode_ms(MsBetween(turn->first_token_time, now));
    t->set_restored(turn->restored);
    t->set_rebuilt(turn->rebuilt);
    turns_.fetch_add(1);

    switch (p.commit) {
      case kls::v1::COMMIT_POLICY_NONE:
        busy_.erase(turn->key);
        turn->sink->OnDone(absl::OkStatus(), std::move(final));
        return;
      case kls::v1::COMMIT_POLICY_ASYNC: {
        ScheduleCommit(s, /*writeback=*/false);
        busy_.erase(turn->key);
        turn->sink->OnDone(absl::OkStatus(), std::move(final));
        return;
      }
      default:
        break;
    }
    // SYNC: the final message waits for the store; a failed commit rolls the turn back.
    absl::StatusOr<store::CommitRequest> commit = BuildCommit(s);
    if (!commit.ok()) {
      Rollback(*turn);
      return FailTurn(std::move(turn), commit.status());
    }
    const absl::Time commit_start = absl::Now();
    const std::optional<uint64_t> expected = commit->expected_version;
    commits_.Schedule([this, commit = *std::move(commit), turn = std::move(turn), commit_start,
                       expected]() mutable {
      absl::Status status = store_->Commit(commit);
      Post([this, status, record = std::move(commit.record), turn = std::move(turn), commit_start,
            expected]() mutable {
        HotSession& s = *turn->session;
        if (!status.ok()) {
          commit_failures_.fetch_add(1);
          KLS_LOG(WARNING) << "commit of session " << turn->params.session_id << " v"
                           << record.version() << " failed: " << status;
          // ABORTED means another worker owns the session only if this commit expected the
          // version the store is known to hold; otherwise an earlier commit of ours failed.
          const bool foreign = absl::IsAborted(status) && ExpectedDurable(s, expected);
          Rollback(*turn);
          s.base = s.durable;  // earlier commits have all reported (the lane is FIFO)
          const std::string key = turn->key;
          FailTurn(std::move(turn), status);
          if (foreign) Drop(key);
          return;
        }
        MarkDurable(s, record);
        turn->final.mutable_timings()->set_commit_ms(MsBetween(commit_start, absl::Now()));
        busy_.erase(turn->key);
        turn->sink->OnDone(absl::OkStatus(), std::move(turn->final));
      });
    });
  }

  // ---- Commits -------------------------------------------------------------------------------

  // The snapshot of `s` at its latest version: all state chunks, the MLA blocks the store may
  // lack, the token history and the record (written last). Updates `s.base`.
  absl::StatusOr<store::CommitRequest> BuildCommit(HotSession& s) {
    store::CommitRequest c;
    c.record = s.record;
    if (s.base.has_value()) c.expected_version = s.base->version();
    // The host form: KDA state, and the MLA rows of the blocks the store lacks.
    constexpr int kBlock = engine::kMlaBlockTokens;
    SessionState host;
    KLS_RETURN_IF_ERROR(backend_->ExportState(
        *s.state,
        std::min(static_cast<int64_t>(s.durable_full_blocks) * kBlock, s.state->num_tokens()),
        &host));
    KLS_ASSIGN_OR_RETURN(c.state_chunks, engine::EncodeStateChunks(host, config_, fingerprint_));
    c.record.set_state_chunks(s.record.num_fed_tokens() > 0 ? c.state_chunks.size() : 0);
    if (s.record.num_fed_tokens() == 0) c.state_chunks.clear();

    // MLA blocks of the fed tokens: chained hashes; the last block may be partial.
    const int64_t fed = host.num_tokens();
    const std::span<const int32_t> tokens(s.history.data(), fed);
    while (static_cast<int64_t>(s.full_block_hashes.size()) < fed / kBlock) {
      const size_t i = s.full_block_hashes.size();
      const Hash128 previous = i == 0 ? Hash128{} : s.full_block_hashes[i - 1];
      s.full_block_hashes.push_back(engine::MlaBlockHash(fingerprint_,
                                                         engine::SnapshotDType::kFloat32, previous,
                                                         tokens.subspan(i * kBlock, kBlock)));
    }
    std::vector<Hash128> hashes = s.full_block_hashes;
    if (fed % kBlock != 0) {
      const size_t i = hashes.size();
      hashes.push_back(engine::MlaBlockHash(fingerprint_, engine::SnapshotDType::kFloat32,
                                            i == 0 ? Hash128{} : hashes[i - 1],
                                            tokens.subspan(i * kBlock)));
    }
    c.record.clear_block_keys();
    for (const Hash128& h : hashes) c.record.add_block_keys(HashBytes(h));
    for (size_t i = s.durable_full_blocks; i < hashes.size(); ++i) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, fed - i * kBlock));
      KLS_ASSIGN_OR_RETURN(std::string block,
                           engine::EncodeMlaBlock(host, config_, fingerprint_, i * kBlock, n));
      c.blocks.emplace_back(HashBytes(hashes[i]), std::move(block));
    }

    // Older versions stay readable for a while (forks of recent versions, debugging).
    c.record.clear_retained_states();
    if (s.base.has_value()) {
      *c.record.mutable_retained_states() = s.base->retained_states();
      if (s.base->state_chunks() > 0 && s.base->version() != c.record.version()) {
        kls::v1::StateRef* ref = c.record.add_retained_states();
        ref->set_version(s.base->version());
        ref->set_chunks(s.base->state_chunks());
        ref->set_num_fed_tokens(s.base->num_fed_tokens());
        *ref->mutable_block_keys() = s.base->block_keys();
      }
      const int excess = c.record.retained_states_size() - options_.retained_versions;
      for (int i = 0; i < excess; ++i) {
        c.drop_state_versions.emplace_back(c.record.retained_states(i).version(),
                                           c.record.retained_states(i).chunks());
      }
      if (excess > 0) c.record.mutable_retained_states()->DeleteSubrange(0, excess);
    }
    c.tokens = s.history;
    c.sync = true;
    s.record = c.record;
    s.base = c.record;
    return c;
  }

  // Whether a commit that expected `expected` expected what the store is known to hold.
  static bool ExpectedDurable(const HotSession& s, const std::optional<uint64_t>& expected) {
    if (!s.durable.has_value()) return !expected.has_value();
    return expected.has_value() && *expected == s.durable->version();
  }

  void MarkDurable(HotSession& s, const SessionRecord& committed) {
    if (!s.durable.has_value() || committed.version() >= s.durable->version()) {
      s.durable = committed;
      s.durable_full_blocks =
          static_cast<int>(committed.num_fed_tokens() / engine::kMlaBlockTokens);
    }
    commits_ok_.fetch_add(1);
  }

  // ASYNC turns and write-backs: the commit runs in the background; a failure leaves the session
  // dirty (the next commit writes everything again) unless another worker took it over.
  void ScheduleCommit(HotSession& s, bool writeback) {
    absl::StatusOr<store::CommitRequest> commit = BuildCommit(s);
    if (!commit.ok()) {
      KLS_LOG(ERROR) << "cannot snapshot session " << s.key << ": " << commit.status();
      return;
    }
    if (writeback) s.writeback_scheduled = true;
    const std::string key = s.key;
    const uint64_t generation = s.generation;
    const std::optional<uint64_t> expected = commit->expected_version;
    commits_.Schedule([this, key, generation, expected, commit = *std::move(commit)]() mutable {
      absl::Status status = store_->Commit(commit);
      Post([this, key, generation, expected, status, record = std::move(commit.record)] {
        HotSession* s = Find(key);
        if (s == nullptr || s->generation != generation) return;  // another copy by now
        s->writeback_scheduled = false;
        if (status.ok()) {
          s->writeback_backoff = absl::Milliseconds(100);
          return MarkDurable(*s, record);
        }
        s->next_writeback = absl::Now() + s->writeback_backoff;
        s->writeback_backoff = std::min(2 * s->writeback_backoff, absl::Seconds(10));
        commit_failures_.fetch_add(1);
        KLS_LOG(WARNING) << "background commit of " << key << " v" << record.version()
                         << " failed: " << status;
        const bool foreign = absl::IsAborted(status) && ExpectedDurable(*s, expected);
        s->base = s->durable;
        if (foreign && !busy_.contains(key)) Drop(key);
      });
    });
  }

  void ScheduleWriteback(HotSession& s) {
    if (s.dirty() && !s.writeback_scheduled && !busy_.contains(s.key) &&
        absl::Now() >= s.next_writeback) {
      ScheduleCommit(s, /*writeback=*/true);
    }
  }

  void CommitNewSession(std::unique_ptr<HotSession> session, Callback<kls::v1::Session> done) {
    const std::string key = session->key;
    busy_.insert(key);
    absl::StatusOr<store::CommitRequest> commit = BuildCommit(*session);
    if (!commit.ok()) {
      busy_.erase(key);
      return done(commit.status());
    }
    commits_.Schedule([this, key, commit = *std::move(commit), session = std::move(session),
                       done = std::move(done)]() mutable {
      absl::Status status = store_->Commit(commit);
      Post([this, key, status, session = std::move(session), done = std::move(done)]() mutable {
        busy_.erase(key);
        if (!status.ok()) {
          if (absl::IsAborted(status)) {
            status = absl::AlreadyExistsError(
                absl::StrCat("session ", session->record.session_id(), " already exists"));
          }
          return done(status);
        }
        MarkDurable(*session, session->record);
        kls::v1::Session view = SessionView(session->record);
        Install(std::move(session));
        done(std::move(view));
      });
    });
  }

  // A new session at `version` of `source` (0: its latest). The latest version copies the
  // KDA/conv state and shares the MLA blocks; an older one keeps only the token history prefix,
  // which the child's first turn prefills.
  void Fork(const std::string& tenant, HotSession& source,
            const kls::v1::ForkSessionRequest& request, Callback<kls::v1::Session> finish) {
    const SessionRecord& sr = source.record;
    const uint64_t version = request.version() == 0 ? sr.version() : request.version();
    if (version > sr.version()) {
      return finish(absl::InvalidArgumentError(
          absl::StrCat("version ", version, " of session ", sr.session_id(),
                       " does not exist; latest is ", sr.version())));
    }
    if (version >= static_cast<uint64_t>(sr.version_history_tokens_size())) {
      return finish(absl::FailedPreconditionError(absl::StrCat(
          "session ", sr.session_id(), " has no history length recorded for version ", version)));
    }
    if (absl::Status s = CheckSessionMetadata({}, SizeOf(request.metadata()),
                                              request.new_session_id(), "the fork's metadata");
        !s.ok()) {
      return finish(s);
    }
    auto child = std::make_unique<HotSession>();
    child->key = Key(tenant, request.new_session_id());
    SessionRecord& r = child->record;
    r.set_format_version(kRecordFormatVersion);
    r.set_tenant(tenant);
    r.set_session_id(request.new_session_id());
    r.set_model_fingerprint(fingerprint_bytes_);
    r.set_version(version);
    r.set_parent_session_id(sr.session_id());
    r.set_parent_version(version);
    r.set_create_time_ms(NowMs());
    r.set_update_time_ms(r.create_time_ms());
    r.set_ttl_seconds(request.ttl_seconds() != 0 ? request.ttl_seconds() : sr.ttl_seconds());
    *r.mutable_metadata() = request.metadata().empty() ? sr.metadata() : request.metadata();
    for (uint64_t v = 0; v <= version; ++v)
      r.add_version_history_tokens(sr.version_history_tokens(v));
    if (version == sr.version()) {
      absl::StatusOr<std::unique_ptr<engine::BackendState>> state =
          WithRoom([&] { return backend_->CloneState(*source.state); });
      if (!state.ok()) return finish(state.status());
      child->history = source.history;
      child->state = *std::move(state);
      child->full_block_hashes = source.full_block_hashes;
      child->durable_full_blocks = source.durable_full_blocks;  // the source's blocks are shared
      r.set_num_fed_tokens(sr.num_fed_tokens());
    } else {
      const uint64_t length = sr.version_history_tokens(version);
      absl::StatusOr<std::unique_ptr<engine::BackendState>> state =
          WithRoom([&] { return backend_->NewState(); });
      if (!state.ok()) return finish(state.status());
      child->history.assign(source.history.begin(), source.history.begin() + length);
      child->state = *std::move(state);
      r.set_num_fed_tokens(0);
    }
    r.set_num_history_tokens(child->history.size());
    CommitNewSession(std::move(child), std::move(finish));
  }

  // ---- Memory --------------------------------------------------------------------------------

  // Keeps hot state within the budget: least recently used idle sessions go first; a dirty one is
  // written back before it is dropped.
  // `bytes`: the hot sessions' state now; returns what is left after eviction.
  int64_t Evict(int64_t bytes) {
    if (bytes <= options_.hot_budget_bytes) return bytes;
    // Pick the victims first: dropping a session erases its LRU node, which a reverse iterator
    // over the list may still reference.
    std::vector<std::string> victims;
    for (auto it = lru_.rbegin(); it != lru_.rend() && bytes > options_.hot_budget_bytes; ++it) {
      HotSession* s = *it;
      if (busy_.contains(s->key)) continue;
      if (s->dirty() || !s->durable.has_value() || s->base->version() != s->durable->version()) {
        ScheduleWriteback(*s);
        continue;
      }
      bytes -= s->state->ByteSize();
      victims.push_back(s->key);
    }
    for (const std::string& key : victims) {
      evictions_.fetch_add(1);
      Drop(key);
    }
    return bytes;
  }

  const EngineOptions options_;
  const std::shared_ptr<const engine::LoadedModel> model_;
  const engine::ModelConfig& config_;
  const Hash128 fingerprint_;
  const std::string fingerprint_bytes_;
  std::unique_ptr<engine::Backend> backend_;
  store::SessionStore* const store_;

  absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void()>> events_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  // Engine thread only.
  absl::flat_hash_map<std::string, std::unique_ptr<HotSession>> hot_;
  std::list<HotSession*> lru_;             // front: most recently used
  absl::flat_hash_set<std::string> busy_;  // sessions with a turn or operation in flight
  std::deque<std::unique_ptr<ActiveTurn>> waiting_;
  std::vector<std::unique_ptr<ActiveTurn>> active_;
  std::vector<engine::SampleRequest> sample_requests_;  // a step's, reused across steps
  std::vector<int32_t> sampled_;                        // a step's tokens (-1: unsamplable)
  bool draining_ = false;
  absl::Status backend_failure_;  // set once the backend fails for good
  uint64_t generations_ = 0;
  size_t preparing_ = 0;  // turns reading their record or restoring

  // Published by the engine thread for GetLoad and Drain.
  std::atomic<uint32_t> active_count_{0}, queued_count_{0}, hot_count_{0};
  std::atomic<uint64_t> hot_bytes_{0};
  std::atomic<bool> idle_{true}, draining_flag_{false};
  std::atomic<uint64_t> turns_{0}, restores_{0}, rebuilds_{0}, evictions_{0}, commits_ok_{0},
      commit_failures_{0};

  TaskPool io_;
  TaskPool commits_;
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const EngineOptions& options, std::shared_ptr<const engine::LoadedModel> model,
    std::unique_ptr<engine::Backend> backend, store::SessionStore* store) {
  if (model == nullptr || model->weights == nullptr || model->tokenizer == nullptr) {
    return absl::InvalidArgumentError("engine: no model");
  }
  if (backend == nullptr || store == nullptr) {
    return absl::InvalidArgumentError("engine: a backend and a store are required");
  }
  if (options.max_running_turns < 1 || options.step_prefill_tokens < 1 ||
      options.max_tokens_limit < 1 || options.io_threads < 1 || options.recent_turns < 0 ||
      options.retained_versions < 0 || options.hot_budget_bytes < 0) {
    return absl::InvalidArgumentError("engine: options out of range");
  }
  return std::unique_ptr<Engine>(
      new Engine(std::make_unique<Impl>(options, std::move(model), std::move(backend), store)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

void Engine::Generate(TurnParams params, std::shared_ptr<TurnSink> sink) {
  impl_->Generate(std::move(params), std::move(sink));
}
void Engine::CreateSession(std::string tenant, kls::v1::CreateSessionRequest request,
                           std::vector<int32_t> system_tokens, Callback<kls::v1::Session> done) {
  impl_->CreateSession(std::move(tenant), std::move(request), std::move(system_tokens),
                       std::move(done));
}
void Engine::GetSession(std::string tenant, kls::v1::GetSessionRequest request,
                        Callback<kls::v1::Session> done) {
  impl_->GetSession(std::move(tenant), std::move(request), std::move(done));
}
void Engine::ListSessions(std::string tenant, kls::v1::ListSessionsRequest request,
                          Callback<kls::v1::ListSessionsResponse> done) {
  impl_->ListSessions(std::move(tenant), std::move(request), std::move(done));
}
void Engine::DeleteSession(std::string tenant, kls::v1::DeleteSessionRequest request,
                           Callback<kls::v1::DeleteSessionResponse> done) {
  impl_->DeleteSession(std::move(tenant), std::move(request), std::move(done));
}
void Engine::ForkSession(std::string tenant, kls::v1::ForkSessionRequest request,
                         Callback<kls::v1::Session> done) {
  impl_->ForkSession(std::move(tenant), std::move(request), std::move(done));
}
kls::v1::Load Engine::GetLoad() const { return impl_->GetLoad(); }
absl::Status Engine::Drain(absl::Duration timeout) { return impl_->Drain(timeout); }
const engine::ModelConfig& Engine::config() const { return impl_->config(); }
const engine::Tokenizer& Engine::tokenizer() const { return impl_->tokenizer(); }
const EngineOptions& Engine::options() const { return impl_->options(); }

}  // namespace kls::worker
