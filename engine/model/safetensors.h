// Safetensors checkpoints: a validating, memory-mapped reader for one file or a sharded
// directory, dtype conversion to fp32, and a writer (used by tests and tools).
//
// File layout (https://github.com/huggingface/safetensors): u64 little-endian header length N,
// N bytes of JSON header {"name": {"dtype", "shape", "data_offsets": [begin, end)}, ...,
// "__metadata__": {string: string}}, then the data section; offsets are relative to it.
#ifndef KLS_ENGINE_MODEL_SAFETENSORS_H_
#define KLS_ENGINE_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/file_util.h"

namespace kls::engine {

enum class DType { kF32, kF16, kBF16 };

// "F32", "F16", "BF16" (safetensors spelling). INVALID_ARGUMENT naming any other dtype.
absl::StatusOr<DType> ParseDType(std::string_view name);
std::string_view DTypeName(DType dtype);  // "F32", "F16", "BF16"
size_t DTypeSize(DType dtype);            // bytes per element

// bfloat16 <-> fp32. FloatToBf16 rounds to nearest even; NaN stays a (quiet) NaN of the same sign.
float Bf16ToFloat(uint16_t bits);
uint16_t FloatToBf16(float value);
// IEEE binary16 <-> fp32. FloatToHalf rounds to nearest even, overflows to ±inf, produces
// subnormals, keeps ±inf and NaN (quiet) with their sign.
float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);

// One tensor of a mapped file. `data` points into the mmap (no alignment guarantee) and holds
// num_bytes = DTypeSize(dtype) × num_elements() bytes, little-endian, row-major.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t num_bytes = 0;

  int64_t num_elements() const;  // product of shape; 1 for a scalar
};

// kIgnoreUnitDims: shapes match when equal after dropping every size-1 dimension
// (e.g. A_log [1, 1, H, 1] read as [H]).
enum class ShapeMatch { kExact, kIgnoreUnitDims };

// One .safetensors file, memory-mapped and validated on Open. Immutable afterwards, so
// concurrent reads from several threads are safe. The TensorViews live as long as this object.
class SafetensorsFile {
 public:
  // Maps and validates `path`: file >= 8 bytes; header length N with 0 < N <= 100 MiB and
  // 8 + N <= file size; header a JSON object without repeated keys; every tensor with a
  // supported dtype, non-negative dims and data_offsets [b, e) with b <= e <= data size,
  // e - b == dtype size × elements; non-empty tensors do not overlap; "__metadata__" (optional)
  // a string -> string map. NOT_FOUND if the file is missing; DATA_LOSS for a truncated file;
  // INVALID_ARGUMENT for a malformed header. Messages name the file and the tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return file_->path(); }
  // Every tensor, ordered by data offset (then name for empty tensors at the same offset).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr if the file has no tensor `name`.
  const TensorView* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  explicit SafetensorsFile(std::unique_ptr<MappedFile> file) : file_(std::move(file)) {}
  absl::Status Parse();

  std::unique_ptr<MappedFile> file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: `model.safetensors.index.json` ({"weight_map": {tensor: shard}})
// if present, else `model.safetensors`. Immutable after Open; thread-safe for reads.
class Checkpoint {
 public:
  // Opens the checkpoint in `model_dir`. NOT_FOUND (naming both files) when neither exists.
  // With an index: every listed shard is opened once; each tensor in weight_map must be in its
  // shard; a tensor present in two shards is an error; shard names must be plain file names
  // (no '/', '\', "." or ".."). Tensors a shard holds but the index omits are still visible.
  // Errors from a shard are those of SafetensorsFile::Open.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);

  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  // nullptr if absent.
  const TensorView* Find(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> TensorNames() const;

  // Converts tensor `name` to fp32 into out[num_elements] (row-major, as stored).
  // INVALID_ARGUMENT "missing tensor 'X'", or "tensor 'X' has shape [a, b], expected [c, d]"
  // when the shape differs from `expected_shape` under `match`; `out` is untouched on error.
  absl::Status ReadFloat(std::string_view name, std::span<const int64_t> expected_shape, float* out,
                         ShapeMatch match = ShapeMatch::kExact) const;

 private:
  Checkpoint() = default;

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> tensors_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string_view bytes;  // little-endian, row-major; DTypeSize(dtype) × elements bytes
};

// Writes a safetensors file: header padded with spaces to a multiple of 8, tensors packed in the
// given order, `metadata` under "__metadata__" (omitted when empty). Written through an
// AtomicFileWriter, so readers never see a partial file and a failed write leaves `path` as it was.
// INVALID_ARGUMENT if a byte size does not match dtype × shape, a dim is negative, or a name is
// empty, repeated, "__metadata__" or not valid UTF-8; I/O errors (those of AtomicFileWriter) name
// the path.
absl::Status WriteSafetensors(const std::string& path, std::span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace kls::engine

#endif  // KLS_ENGINE_MODEL_SAFETENSORS_H_
