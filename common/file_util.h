// Files: whole-file reads, atomic writes, and read-only memory maps.
#ifndef KLS_COMMON_FILE_UTIL_H_
#define KLS_COMMON_FILE_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kls {

// Reads a whole file. NOT_FOUND if it does not exist; other errors name the path and errno.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `contents` to `path` through an AtomicFileWriter, so readers never see a partial file.
// Creates no directories. Errors are those of AtomicFileWriter.
absl::Status WriteStringToFile(const std::string& path, std::string_view contents);

// Writes a file atomically: bytes go to a temporary file in the same directory, and Commit()
// fsyncs it and renames it over `path`, so readers see either the old file or the whole new one.
// Destroying a writer that was not committed removes the temporary file. The temporary name is
// `<path>.tmp.<pid>.<n>` with n from a process-wide counter, so writers of the same path on
// different threads of one process never share a temporary file (the last Commit wins).
// Not thread-safe: one writer is used by one thread at a time.
class AtomicFileWriter {
 public:
  // Creates the temporary file. NOT_FOUND if the directory does not exist, PERMISSION_DENIED if
  // it is not writable, INTERNAL otherwise; messages name the temporary path.
  static absl::StatusOr<std::unique_ptr<AtomicFileWriter>> Create(const std::string& path);
  // Closes and removes the temporary file unless Commit() succeeded.
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  // Appends `bytes` (any size; partial writes are retried). An I/O error names the temporary
  // path and is sticky: later Append and Commit calls return it too. FAILED_PRECONDITION once
  // Commit has been called.
  absl::Status Append(std::string_view bytes);
  // fsyncs and closes the temporary file, then renames it over `path`. On error (including an
  // earlier sticky Append error) `path` is untouched and the temporary file is removed at once.
  // FAILED_PRECONDITION if called twice.
  absl::Status Commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  AtomicFileWriter(std::string path, std::string temp_path, int fd)
      : path_(std::move(path)), temp_path_(std::move(temp_path)), fd_(fd) {}
  // Closes the descriptor (if open) and unlinks the temporary file.
  void Discard();

  std::string path_;
  std::string temp_path_;
  int fd_;  // -1 once closed
  bool commit_called_ = false;
  bool committed_ = false;  // Commit succeeded: the temporary file is now `path`
  absl::Status error_;      // the first I/O error; sticky
};

bool FileExists(const std::string& path);

// A read-only memory map of a whole file. Move-only; unmaps on destruction.
// Thread-safe for concurrent reads of data().
class MappedFile {
 public:
  // NOT_FOUND if the file is missing; INVALID_ARGUMENT if it is not a regular file.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

}  // namespace kls

#endif  // KLS_COMMON_FILE_UTIL_H_
