// `kls chat`: an interactive client of a router's kls.v1.Sessions API. Each input line is one
// user turn on a server-held session (history is never re-sent); lines starting with '/' are
// commands. Model text streams to stdout; prompts, notices and per-turn footers go to stderr,
// so `kls chat < questions.txt > answers.txt` captures only the replies.
//
// Ctrl-C reaches the REPL through a self-pipe: the SIGINT handler only write()s one byte. At the
// prompt the line reader poll()s stdin and the pipe, and leaves; during a turn a watcher thread
// blocks on the pipe and cancels the call (ClientContext::TryCancel is thread-safe), which leaves
// the session at its previous version.
#include <fcntl.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/status.h>
#include <grpcpp/support/sync_stream.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/cli/client_commands.h"

namespace kls::cli {
namespace {

struct ChatFlags {
  ClientFlags client;
  std::string session_id;
  std::string system;
  float temperature = 0.8f;
  float top_p = 1.0f;  // sent only when given (server default otherwise)
  int top_k = 0;
  int max_tokens = 512;
  uint64_t seed = 0;  // sent only when given (server-chosen otherwise)
  bool has_top_p = false;
  bool has_seed = false;
};

// ---------------------------------------------------------------------------------------------
// SIGINT plumbing.

constexpr char kInterruptByte = 'i';
constexpr char kWakeByte = 'w';

// Write end of the self-pipe, read by the handler; set before the handler is installed. A
// lock-free atomic is async-signal-safe to read.
std::atomic<int> g_interrupt_write_fd{-1};
static_assert(std::atomic<int>::is_always_lock_free);

void OnSigint(int) {
  const int saved_errno = errno;
  // A full pipe already holds an unread interrupt, so a failed write loses nothing.
  [[maybe_unused]] ssize_t n = write(g_interrupt_write_fd.load(), &kInterruptByte, 1);
  errno = saved_errno;
}

// Owns the self-pipe and the SIGINT handler; the destructor restores the previous disposition.
// At most one instance per process (the handler uses a global). Thread-compatible, except that
// one watcher thread may block in WaitForInterrupt while another thread calls Wake.
class Interrupts {
 public:
  // INTERNAL when the pipe or the handler cannot be set up.
  static absl::StatusOr<std::unique_ptr<Interrupts>> Install() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
      return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
    }
    auto interrupts = std::unique_ptr<Interrupts>(new Interrupts(fds[0], fds[1]));
    g_interrupt_write_fd.store(fds[1]);
    struct sigaction action = {};
    action.sa_handler = OnSigint;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: poll() returns EINTR and looks at the pipe
    if (sigaction(SIGINT, &action, &interrupts->previous_) != 0) {
      return absl::InternalError(absl::StrCat("sigaction(SIGINT): ", std::strerror(errno)));
    }
    interrupts->installed_ = true;
    return interrupts;
  }

  Interrupts(const Interrupts&) = delete;
  Interrupts& operator=(const Interrupts&) = delete;
  ~Interrupts() {
    if (installed_) sigaction(SIGINT, &previous_, nullptr);
    g_interrupt_write_fd.store(-1);
    close(read_fd_);
    close(write_fd_);
  }

  int read_fd() const { return read_fd_; }

  // Blocks until Ctrl-C (true) or Wake (false). Reads one byte at a time, so bytes written
  // after the one that ends the wait stay for Drain.
  bool WaitForInterrupt() {
    while (true) {
      pollfd p = {read_fd_, POLLIN, 0};
      if (poll(&p, 1, -1) < 0 && errno != EINTR) return false;
      char byte;
      if (read(read_fd_, &byte, 1) == 1) return byte == kInterruptByte;
    }
  }

  // Ends a WaitForInterrupt without an interrupt.
  void Wake() {
    // The pipe has room: at most a few bytes are ever pending.
    [[maybe_unused]] ssize_t n = write(write_fd_, &kWakeByte, 1);
  }

  // Discards pending bytes; true when a Ctrl-C was among them.
  bool Drain() {
    bool interrupted = false;
    char buffer[64];
    ssize_t n;
    while ((n = read(read_fd_, buffer, sizeof(buffer))) > 0) {
      for (ssize_t i = 0; i < n; ++i) interrupted |= buffer[i] == kInterruptByte;
    }
    return interrupted;
  }

 private:
  Interrupts(int read_fd, int write_fd) : read_fd_(read_fd), write_fd_(write_fd) {}

  const int read_fd_;
  const int write_fd_;
  bool installed_ = false;
  struct sigaction previous_ = {};
};

// Reads lines from a file descriptor while watching for Ctrl-C. Thread-compatible.
class LineReader {
 public:
  enum class Result { kLine, kEndOfInput, kInterrupted };

  LineReader(int fd, Interrupts* interrupts) : fd_(fd), interrupts_(interrupts) {}

  // kLine with the next line (without "\n" or "\r\n"); kEndOfInput at end of input (after an
  // unterminated last line) or on a read error; kInterrupted on Ctrl-C.
  Result Next(std::string* line) {
    while (true) {
      if (const size_t end = buffer_.find('\n'); end != std::string::npos) {
        line->assign(buffer_, 0, end);
        buffer_.erase(0, end + 1);
        if (!line->empty() && line->back() == '\r') line->pop_back();
        return Result::kLine;
      }
      if (eof_) {
        if (buffer_.empty()) return Result::kEndOfInput;
        line->swap(buffer_);
        buffer_.clear();
        return Result::kLine;
      }
      pollfd fds[2] = {{fd_, POLLIN, 0}, {interrupts_->read_fd(), POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;  // the handler's byte is in the pipe: next round sees it
        eof_ = true;
        continue;
      }
      if ((fds[1].revents & POLLIN) && interrupts_->Drain()) return Result::kInterrupted;
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        char chunk[4096];
        const ssize_t n = read(fd_, chunk, sizeof(chunk));
        if (n > 0) {
          buffer_.append(chunk, static_cast<size_t>(n));
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
          eof_ = true;
        }
      }
    }
  }

 private:
  const int fd_;
  Interrupts* const interrupts_;
  std::string buffer_;
  bool eof_ = false;
};

// ---------------------------------------------------------------------------------------------
// The REPL.

// 32 random hex digits: the idempotency key of one turn.
std::string NewRequestId() {
  std::random_device entropy;
  std::string id;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&id, absl::Hex(entropy(), absl::kZeroPad8));
  return id;
}

const char* FinishReasonText(kls::v1::FinishReason reason) {
  switch (reason) {
    case kls::v1::FINISH_REASON_STOP:
      return "stop";
    case kls::v1::FINISH_REASON_LENGTH:
      return "length";
    case kls::v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

constexpr char kHelp[] =
    "Each line is a user message. Commands:\n"
    "  /fork [NEW_ID]  fork the session at its latest version and continue on the fork\n"
    "  /history        print the session's history\n"
    "  /new [ID]       start a new session\n"
    "  /session        print the session id and version\n"
    "  /help           this text\n"
    "  /quit           leave (also end of input, or Ctrl-C at the prompt)\n"
    "Ctrl-C during a reply cancels that turn; the session stays at its previous version.\n";

// One chat on one router. Thread-compatible; one thread runs it (plus the per-turn watcher).
class Chat {
 public:
  Chat(const ChatFlags& flags, Interrupts* interrupts, bool interactive, bool color)
      : flags_(flags),
        interrupts_(interrupts),
        stub_(NewSessionsStub(flags.client)),
        interactive_(interactive),
        color_(color) {}

  // Resumes --session or creates a new session. False (error printed) on failure.
  bool Start() {
    if (flags_.session_id.empty()) return NewSession("");
    grpc::ClientContext context;
    PrepareContext(flags_.client, /*unary=*/true, &context);
    kls::v1::GetSessionRequest request;
    request.set_session_id(flags_.session_id);
    kls::v1::Session session;
    if (const grpc::Status status = stub_->GetSession(&context, request, &session); !status.ok()) {
      return Error(status);
    }
    SwitchTo(session, "resumed");
    return true;
  }

  // The REPL; returns the exit code: 0, or 1 when input was not a terminal and a turn or
  // command failed (so scripts notice).
  int Run() {
    if (interactive_) std::fprintf(stderr, "/help lists commands.\n");
    LineReader reader(STDIN_FILENO, interrupts_);
    std::string line;
    while (true) {
      if (interactive_) {
        std::fprintf(stderr, "%s> %s", color_ ? "\x1b[1m" : "", color_ ? "\x1b[0m" : "");
        std::fflush(stderr);
      }
      const LineReader::Result result = reader.Next(&line);
      if (result != LineReader::Result::kLine) {
        if (interactive_) std::fprintf(stderr, "\n");
        break;
      }
      if (absl::StripAsciiWhitespace(line).empty()) continue;
      if (line[0] == '/') {
        if (!Command(line)) break;
      } else {
        Turn(line);
      }
    }
    return had_error_ && !interactive_ ? 1 : 0;
  }

 private:
  // Runs a /command; false for /quit.
  bool Command(const std::string& line) {
    std::vector<std::string> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    const std::string& name = words[0];
    const size_t args = words.size() - 1;
    auto usage = [&](const char* text) {
      std::fprintf(stderr, "error: usage: %s\n", text);
      had_error_ = true;
      return true;
    };
    if (name == "/quit" || name == "/exit") return false;
    if (name == "/help") {
      std::fputs(kHelp, stdout);
    } else if (name == "/session") {
      if (args != 0) return usage("/session");
      std::printf("%s version %llu\n", session_id_.c_str(),
                  static_cast<unsigned long long>(version_));
    } else if (name == "/new") {
      if (args > 1) return usage("/new [ID]");
      NewSession(args == 1 ? words[1] : "");
    } else if (name == "/fork") {
      if (args > 1) return usage("/fork [NEW_ID]");
      Fork(args == 1 ? words[1] : "");
    } else if (name == "/history") {
      if (args != 0) return usage("/history");
      History();
    } else {
      std::fprintf(stderr, "error: unknown command %s; /help lists the commands\n", name.c_str());
      had_error_ = true;
    }
    std::fflush(stdout);
    return true;
  }

  bool NewSession(const std::string& id) {
    grpc::ClientContext context;
    PrepareContext(flags_.client, /*unary=*/true, &context);
    kls::v1::CreateSessionRequest request;
    request.set_system_prompt(flags_.system);
    request.set_session_id(id);
    kls::v1::Session session;
    if (const grpc::Status status = stub_->CreateSession(&context, request, &session);
        !status.ok()) {
      return Error(status);
    }
    SwitchTo(session, "new");
    return true;
  }

  void Fork(const std::string& new_id) {
    grpc::ClientContext context;
    PrepareContext(flags_.client, /*unary=*/true, &context);
    kls::v1::ForkSessionRequest request;
    request.set_session_id(session_id_);
    request.set_version(0);  // the latest committed version
    request.set_new_session_id(new_id);
    kls::v1::Session child;
    if (const grpc::Status status = stub_->ForkSession(&context, request, &child); !status.ok()) {
      Error(status);
      return;
    }
    SwitchTo(child,
             absl::StrCat("forked from ", child.parent_session_id(), "@", child.parent_version()));
  }

  void History() {
    grpc::ClientContext context;
    PrepareContext(flags_.client, /*unary=*/true, &context);
    kls::v1::GetSessionRequest request;
    request.set_session_id(session_id_);
    request.set_include_history(true);
    kls::v1::Session session;
    if (const grpc::Status status = stub_->GetSession(&context, request, &session); !status.ok()) {
      Error(status);
      return;
    }
    version_ = session.version();
    const std::string& text = session.history_text();
    std::fwrite(text.data(), 1, text.size(), stdout);
    if (!text.empty() && text.back() != '\n') std::fputc('\n', stdout);
  }

  // One user turn: streams the reply to stdout, then a footer to stderr.
  void Turn(const std::string& text) {
    kls::v1::GenerateRequest request;
    request.set_session_id(session_id_);
    kls::v1::Message* message = request.add_messages();
    message->set_role("user");
    message->set_content(text);
    kls::v1::SamplingParams* sampling = request.mutable_sampling();
    sampling->set_temperature(flags_.temperature);
    if (flags_.has_top_p) sampling->set_top_p(flags_.top_p);
    sampling->set_top_k(flags_.top_k);
    if (flags_.has_seed) sampling->set_seed(flags_.seed);
    sampling->set_max_tokens(flags_.max_tokens);
    request.set_request_id(NewRequestId());

    grpc::ClientContext context;
    PrepareContext(flags_.client, /*unary=*/false, &context);
    interrupts_->Drain();  // an earlier, already handled Ctrl-C is not about this turn
    std::atomic<bool> cancelled{false};
    std::thread watcher([this, &context, &cancelled] {
      if (interrupts_->WaitForInterrupt()) {
        cancelled.store(true);
        context.TryCancel();
      }
    });

    std::unique_ptr<grpc::ClientReader<kls::v1::GenerateResponse>> reader =
        stub_->Generate(&context, request);
    kls::v1::GenerateResponse response;
    kls::v1::GenerateResponse final_response;
    bool have_final = false;
    bool at_line_start = true;
    while (reader->Read(&response)) {
      if (!response.text().empty()) {
        std::fwrite(response.text().data(), 1, response.text().size(), stdout);
        std::fflush(stdout);
        at_line_start = response.text().back() == '\n';
      }
      if (response.finish_reason() != kls::v1::FINISH_REASON_UNSPECIFIED) {
        final_response = std::move(response);
        have_final = true;
      }
    }
    const grpc::Status status = reader->Finish();
    interrupts_->Wake();
    watcher.join();
    interrupts_->Drain();
    if (!at_line_start) {
      std::fputc('\n', stdout);
      std::fflush(stdout);
    }

    if (status.ok() && have_final) {
      version_ = final_response.version();
      Footer(final_response);
    } else if (status.ok()) {
      std::fprintf(stderr, "error: the reply ended without a final message\n");
      had_error_ = true;
    } else if (cancelled.load() && status.error_code() == grpc::StatusCode::CANCELLED) {
      Notice("cancelled; the turn was not committed");
    } else {
      Error(status);
    }
  }

  void Footer(const kls::v1::GenerateResponse& last) {
    std::string text = absl::StrFormat(
        "[%u tokens · %s · version %u · %u in context · ttft %.1f ms · decode %.1f ms",
        last.usage().completion_tokens(), FinishReasonText(last.finish_reason()), last.version(),
        last.usage().context_tokens(), last.timings().ttft_ms(), last.timings().decode_ms());
    if (last.timings().restored()) absl::StrAppend(&text, " · restored");
    if (last.timings().rebuilt()) absl::StrAppend(&text, " · rebuilt");
    if (last.replayed()) absl::StrAppend(&text, " · replayed");
    absl::StrAppend(&text, "]");
    Notice(text);
  }

  void SwitchTo(const kls::v1::Session& session, const std::string& how) {
    session_id_ = session.session_id();
    version_ = session.version();
    Notice(absl::StrFormat("session %s (%s, version %u, %u tokens)", session_id_, how, version_,
                           session.num_tokens()));
  }

  // A dim line on stderr (plain when not on a terminal).
  void Notice(const std::string& text) {
    std::fprintf(stderr, "%s%s%s\n", color_ ? "\x1b[2m" : "", text.c_str(),
                 color_ ? "\x1b[0m" : "");
  }

  // Prints "error: <CODE>: <message>"; always false, for `return Error(status);`.
  bool Error(const grpc::Status& status) {
    std::fprintf(stderr, "error: %s\n", RpcErrorText(status).c_str());
    had_error_ = true;
    return false;
  }

  const ChatFlags& flags_;
  Interrupts* const interrupts_;
  const std::unique_ptr<kls::v1::Sessions::Stub> stub_;
  const bool interactive_;
  const bool color_;
  std::string session_id_;
  uint64_t version_ = 0;
  bool had_error_ = false;
};

// Usage errors the server would also reject, caught before connecting.
absl::Status ValidateFlags(const ChatFlags& flags) {
  if (!std::isfinite(flags.temperature) || flags.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--temperature must be finite and >= 0, got ", flags.temperature));
  }
  if (flags.has_top_p && !(flags.top_p > 0 && flags.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--top-p must be in (0, 1], got ", flags.top_p));
  }
  return absl::OkStatus();
}

}  // namespace

std::function<int()> AddChatCommand(CLI::App& app) {
  auto flags = std::make_shared<ChatFlags>();
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model on a router (one line per turn)");
  AddClientFlags(cmd, &flags->client);
  auto* session = cmd->add_option("--session", flags->session_id,
                                  "Resume this session instead of creating a new one");
  cmd->add_option("--system", flags->system, "System prompt of new sessions")->excludes(session);
  cmd->add_option("--temperature", flags->temperature, "Sampling temperature; 0 is greedy")
      ->capture_default_str();
  auto* top_p = cmd->add_option("--top-p", flags->top_p, "Nucleus sampling mass in (0, 1]");
  cmd->add_option("--top-k", flags->top_k, "Keep the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-tokens", flags->max_tokens, "Most tokens generated per turn")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  auto* seed = cmd->add_option("--seed", flags->seed, "Sampling seed of every turn");
  return [flags, top_p, seed]() -> int {
    flags->has_top_p = top_p->count() > 0;
    flags->has_seed = seed->count() > 0;
    if (absl::Status s = ValidateFlags(*flags); !s.ok()) {
      std::fprintf(stderr, "kls chat: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    absl::StatusOr<std::unique_ptr<Interrupts>> interrupts = Interrupts::Install();
    if (!interrupts.ok()) {
      std::fprintf(stderr, "kls chat: %s\n", interrupts.status().ToString().c_str());
      return 1;
    }
    const bool interactive = isatty(STDIN_FILENO) == 1;
    const bool color =
        interactive && isatty(STDERR_FILENO) == 1 && std::getenv("NO_COLOR") == nullptr;
    Chat chat(*flags, interrupts->get(), interactive, color);
    if (!chat.Start()) return 1;
    return chat.Run();
  };
}

}  // namespace kls::cli
