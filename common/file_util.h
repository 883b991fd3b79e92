// Files: whole-file reads, atomic writes, and read-only memory maps.
#ifndef KLS_COMMON_FILE_UTIL_H_
#define KLS_COMMON_FILE_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kls {

// Reads a whole file. NOT_FOUND if it does not exist; other errors name the path and errno.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `contents` to `path` through a temporary file and rename, so readers never see a
// partial file. Creates no directories.
absl::Status WriteStringToFile(const std::string& path, std::string_view contents);

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
