#include "engine/model/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <ranges>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace kls::engine {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host needs byte swaps");

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

// This Abseil build has its own string_view type; std::string_view needs an explicit hop.
absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status FileError(absl::StatusCode code, absl::string_view path, absl::string_view msg) {
  return absl::Status(code, absl::StrCat(path, ": ", msg));
}
absl::Status HeaderError(absl::string_view path, absl::string_view msg) {
  return FileError(absl::StatusCode::kInvalidArgument, path, msg);
}
absl::Status TensorError(absl::string_view path, absl::string_view tensor, absl::string_view msg) {
  return HeaderError(path, absl::StrCat("tensor '", tensor, "': ", msg));
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// One element of an untrusted JSON array for an error message: an integer as its value, anything
// else by its type name. Never dump(): it recurses once per nesting level, so a deeply nested
// header would overflow the stack.
std::string DescribeElement(const json& v) {
  if (v.is_number_unsigned()) return absl::StrCat(v.get<uint64_t>());
  if (v.is_number_integer()) return absl::StrCat(v.get<int64_t>());
  if (v.is_number_float()) return absl::StrCat(v.get<double>());
  return v.type_name();
}

// A non-negative JSON integer that fits int64 (nlohmann stores positive literals as unsigned).
bool JsonToNonNegative(const json& v, int64_t* out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
    return *out >= 0;
  }
  return false;
}

// dtype size × product(shape) in bytes; false on overflow.
bool ByteSize(DType dtype, std::span<const int64_t> shape, uint64_t* out) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *out = n;
  return true;
}

template <typename Convert>
void ConvertElements(const uint8_t* src, size_t n, float* out, Convert convert) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, src + 2 * i, sizeof(bits));  // unaligned-safe
    out[i] = convert(bits);
  }
}

bool ShapesMatch(std::span<const int64_t> actual, std::span<const int64_t> expected,
                 ShapeMatch match) {
  if (match == ShapeMatch::kExact) return std::ranges::equal(actual, expected);
  const auto not_unit = [](int64_t d) { return d != 1; };
  auto a = actual | std::views::filter(not_unit);
  auto e = expected | std::views::filter(not_unit);
  return std::ranges::equal(a, e);
}

// A shard file name from the index must stay inside the checkpoint directory.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos;
}

}  // namespace

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype '", ToAbsl(name), "' (supported: F32, F16, BF16)"));
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

float Bf16ToFloat(uint16_t bits) { return std::bit_cast<float>(uint32_t{bits} << 16); }

uint16_t FloatToBf16(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN; truncation could give inf
  }
  const uint32_t rounding_bias = 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding_bias) >> 16);  // overflows to inf, as RNE should
}

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = uint32_t{bits & 0x8000u} << 16;
  const uint32_t exp = (bits >> 10) & 0x1Fu;
  uint32_t mant = bits & 0x3FFu;
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return std::bit_cast<float>(sign);
  // Subnormal: normalize. mant × 2^-24 with the leading one moved to bit 10.
  uint32_t e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return std::bit_cast<float>(sign | (e << 23) | ((mant & 0x3FFu) << 13));
}

uint16_t FloatToHalf(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or NaN
    if (abs == 0x7F800000u) return sign | 0x7C00u;
    return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));  // quiet NaN
  }
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
  const uint32_t exp = abs >> 23;
  if (exp >= 113) {  // normal half: rebias, round 13 dropped bits to nearest even
    const uint32_t rebiased = abs - (uint32_t{112} << 23);
    const uint32_t rounded = rebiased + 0xFFFu + ((rebiased >> 13) & 1u);
    return static_cast<uint16_t>(sign | (rounded >> 13));  // a carry may bump the exponent
  }
  if (exp < 102) return sign;  // below 2^-25: rounds to zero (2^-25 itself ties to even 0)
  // Subnormal half: value / 2^-24 = mant × 2^(exp - 126), rounded to nearest even.
  const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exp;  // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rem = mant & ((1u << shift) - 1);
  uint32_t result = mant >> shift;
  if (rem > half || (rem == half && (result & 1u))) ++result;  // may become the smallest normal
  return static_cast<uint16_t>(sign | result);
}

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapped, MappedFile::Open(path));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(std::move(mapped)));
  KLS_RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::Status SafetensorsFile::Parse() {
  const std::string& path = file_->path();
  const uint8_t* base = file_->data();
  const size_t size = file_->size();
  if (size < 8) {
    return FileError(
        absl::StatusCode::kDataLoss, path,
        absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length prefix"));
  }
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t{base[i]} << (8 * i);
  if (header_len == 0) return HeaderError(path, "header length is 0");
  if (header_len > kMaxHeaderBytes) {
    return HeaderError(path, absl::StrCat("header length ", header_len,
                                          " exceeds the 100 MiB limit (not a safetensors file?)"));
  }
  if (header_len > size - 8) {
    return FileError(absl::StatusCode::kDataLoss, path,
                     absl::StrCat("header length ", header_len, " runs past the end of the ", size,
                                  "-byte file (truncated?)"));
  }
  const auto* text = reinterpret_cast<const char*>(base + 8);
  // nlohmann stops at a NUL as if the input ended; the format allows only space padding.
  if (const void* nul = std::memchr(text, '\0', header_len); nul != nullptr) {
    return HeaderError(path, absl::StrCat("header is not valid JSON (NUL byte at header offset ",
                                          static_cast<const char*>(nul) - text, ")"));
  }

  // nlohmann keeps the last of repeated keys; a repeated tensor name is refused instead.
  std::set<std::string, std::less<>> seen;
  std::string repeated;
  const json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && repeated.empty()) repeated = key;
    }
    return true;
  };
  const json root = json::parse(text, text + header_len, on_event, /*allow_exceptions=*/false);
  if (root.is_discarded()) return HeaderError(path, "header is not valid JSON");
  if (!root.is_object()) {
    return HeaderError(path,
                       absl::StrCat("header is a JSON ", root.type_name(), ", expected an object"));
  }
  if (!repeated.empty()) {
    return HeaderError(path, absl::StrCat("header repeats the key '", repeated, "'"));
  }

  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Range {
    uint64_t begin, end;
  };
  std::vector<Range> ranges;
  std::vector<TensorView> views;
  for (const auto& [name, info] : root.items()) {
    if (name == kMetadataKey) {
      if (!info.is_object()) return HeaderError(path, "__metadata__ must be a JSON object");
      for (const auto& [key, value] : info.items()) {
        if (!value.is_string()) {
          return HeaderError(
              path, absl::StrCat("__metadata__ value of '", key, "' must be a string (got ",
                                 value.type_name(), ")"));
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    if (!info.is_object()) {
      return TensorError(path, name,
                         absl::StrCat("entry must be a JSON object (got ", info.type_name(), ")"));
    }
    auto dtype_it = info.find("dtype");
    auto shape_it = info.find("shape");
    auto offsets_it = info.find("data_offsets");
    if (dtype_it == info.end() || !dtype_it->is_string()) {
      return TensorError(path, name, "'dtype' must be a string");
    }
    if (shape_it == info.end() || !shape_it->is_array()) {
      return TensorError(path, name, "'shape' must be an array of integers");
    }
    if (offsets_it == info.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return TensorError(path, name, "'data_offsets' must be an array of two integers");
    }
    TensorView view;
    view.name = name;
    absl::StatusOr<DType> dtype = ParseDType(dtype_it->get_ref<const std::string&>());
    if (!dtype.ok()) return TensorError(path, name, dtype.status().message());
    view.dtype = *dtype;
    for (const json& d : *shape_it) {
      int64_t dim = 0;
      if (!d.is_number_integer()) {
        return TensorError(path, name, "'shape' must be an array of integers");
      }
      if (!JsonToNonNegative(d, &dim)) {
        return TensorError(path, name,
                           absl::StrCat("'shape' has an invalid dimension ", DescribeElement(d),
                                        " (dims must be >= 0)"));
      }
      view.shape.push_back(dim);
    }
    int64_t begin = 0, end = 0;
    if (!JsonToNonNegative((*offsets_it)[0], &begin) ||
        !JsonToNonNegative((*offsets_it)[1], &end)) {
      return TensorError(path, name,
                         absl::StrCat("'data_offsets' must be two non-negative integers, got [",
                                      DescribeElement((*offsets_it)[0]), ", ",
                                      DescribeElement((*offsets_it)[1]), "]"));
    }
    const auto b = static_cast<uint64_t>(begin);
    const auto e = static_cast<uint64_t>(end);
    if (b > e) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", b, ", ", e, ") has begin > end"));
    }
    if (e > data_size) {
      return FileError(
          absl::StatusCode::kDataLoss, path,
          absl::StrCat("tensor '", name, "': data_offsets [", b, ", ", e, ") end past the ",
                       data_size, "-byte data section (truncated file?)"));
    }
    uint64_t expected_bytes = 0;
    if (!ByteSize(view.dtype, view.shape, &expected_bytes)) {
      return TensorError(path, name, absl::StrCat("shape ", ShapeString(view.shape), " overflows"));
    }
    if (e - b != expected_bytes) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", b, ", ", e, ") hold ", e - b,
                                      " bytes, but ", ToAbsl(DTypeName(view.dtype)), " ",
                                      ShapeString(view.shape), " needs ", expected_bytes));
    }
    view.data = data + b;
    view.num_bytes = static_cast<size_t>(e - b);
    views.push_back(std::move(view));
    ranges.push_back({b, e});
  }

  std::vector<size_t> order(views.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    return std::tie(ranges[x].begin, ranges[x].end, views[x].name) <
           std::tie(ranges[y].begin, ranges[y].end, views[y].name);
  });
  uint64_t covered_to = 0;  // end of the furthest non-empty tensor so far
  const std::string* covered_by = nullptr;
  for (size_t i : order) {
    if (ranges[i].begin == ranges[i].end) continue;  // empty tensors overlap nothing
    if (ranges[i].begin < covered_to) {
      return TensorError(
          path, views[i].name,
          absl::StrCat("data_offsets [", ranges[i].begin, ", ", ranges[i].end, ") overlap tensor '",
                       *covered_by, "' (ending at ", covered_to, ")"));
    }
    covered_to = ranges[i].end;
    covered_by = &views[i].name;
  }
  tensors_.reserve(views.size());
  for (size_t i : order) {
    index_[views[i].name] = tensors_.size();
    tensors_.push_back(std::move(views[i]));
  }
  return absl::OkStatus();
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& model_dir) {
  const std::string index_path = absl::StrCat(model_dir, "/", kIndexFile);
  const std::string single_path = absl::StrCat(model_dir, "/", kSingleFile);
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());

  if (!FileExists(index_path)) {
    if (!FileExists(single_path)) {
      return absl::NotFoundError(absl::StrCat("no checkpoint in ", model_dir, ": neither ",
                                              index_path, " nor ", single_path, " exists"));
    }
    KLS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    for (const TensorView& t : file->tensors()) ckpt->tensors_[t.name] = &t;
    ckpt->files_.push_back(std::move(file));
    return ckpt;
  }

  KLS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
  const json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object()) {
    return HeaderError(index_path, "not a JSON object");
  }
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    return HeaderError(index_path, "'weight_map' must be a JSON object");
  }
  if (map_it->empty()) return HeaderError(index_path, "'weight_map' is empty");
  std::map<std::string, std::vector<std::string>> by_shard;  // sorted: deterministic order
  for (const auto& [tensor, shard] : map_it->items()) {
    if (!shard.is_string()) {
      return HeaderError(
          index_path, absl::StrCat("weight_map entry of tensor '", tensor, "' must be a string"));
    }
    const std::string& shard_name = shard.get_ref<const std::string&>();
    if (!IsPlainFileName(shard_name)) {
      return HeaderError(index_path, absl::StrCat("shard '", shard_name, "' of tensor '", tensor,
                                                  "' is not a plain file name"));
    }
    by_shard[shard_name].push_back(tensor);
  }

  std::map<std::string_view, std::string_view> owner;  // tensor -> shard that holds it
  for (const auto& [shard_name, listed] : by_shard) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(absl::StrCat(model_dir, "/", shard_name));
    if (!file.ok()) {
      return absl::Status(file.status().code(), absl::StrCat(index_path, ": shard '", shard_name,
                                                             "': ", file.status().message()));
    }
    for (const std::string& tensor : listed) {
      if ((*file)->Find(tensor) == nullptr) {
        return HeaderError(index_path, absl::StrCat("tensor '", tensor, "' is mapped to shard '",
                                                    shard_name, "', which does not contain it"));
      }
    }
    for (const TensorView& t : (*file)->tensors()) {
      auto [it, inserted] = owner.emplace(t.name, shard_name);
      if (!inserted) {
        return HeaderError(index_path,
                           absl::StrCat("tensor '", t.name, "' is in two shards: '",
                                        ToAbsl(it->second), "' and '", shard_name, "'"));
      }
      ckpt->tensors_[t.name] = &t;
    }
    ckpt->files_.push_back(*std::move(file));
  }
  return ckpt;
}

const TensorView* Checkpoint::Find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, view] : tensors_) names.push_back(name);
  return names;
}

absl::Status Checkpoint::ReadFloat(std::string_view name, std::span<const int64_t> expected_shape,
                                   float* out, ShapeMatch match) const {
  const TensorView* t = Find(name);
  if (t == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("missing tensor '", ToAbsl(name), "'"));
  if (!ShapesMatch(t->shape, expected_shape, match)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", ToAbsl(name), "' has shape ", ShapeString(t->shape), ", expected ",
                     ShapeString(expected_shape),
                     match == ShapeMatch::kIgnoreUnitDims ? " (ignoring size-1 dims)" : ""));
  }
  const auto n = static_cast<size_t>(t->num_elements());
  if (n == 0) return absl::OkStatus();
  if (out == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", ToAbsl(name), "': output is null"));
  }
  switch (t->dtype) {
    case DType::kF32:
      std::memcpy(out, t->data, n * sizeof(float));
      break;
    case DType::kBF16:
      ConvertElements(t->data, n, out, Bf16ToFloat);
      break;
    case DType::kF16:
      ConvertElements(t->data, n, out, HalfToFloat);
      break;
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, std::span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == kMetadataKey || !kls::IsValidUtf8(t.name)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": invalid tensor name '", t.name, "'"));
    }
    if (header.contains(t.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", t.name, "' is given twice"));
    }
    uint64_t bytes = 0;
    if (!ByteSize(t.dtype, t.shape, &bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "': shape ",
                                                     ShapeString(t.shape), " is invalid"));
    }
    if (bytes != t.bytes.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", t.name, "': ", ToAbsl(DTypeName(t.dtype)), " ",
                       ShapeString(t.shape), " needs ", bytes, " bytes, got ", t.bytes.size()));
    }
    json entry = json::object();
    entry["dtype"] = std::string(DTypeName(t.dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = json::array({offset, offset + bytes});
    header[t.name] = std::move(entry);
    offset += bytes;
  }
  if (!metadata.empty()) {
    for (const auto& [key, value] : metadata) {
      if (!kls::IsValidUtf8(key) || !kls::IsValidUtf8(value)) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": metadata entry '", key, "' is not valid UTF-8"));
      }
    }
    header[kMetadataKey] = metadata;
  }
  std::string prefix(8, '\0');
  prefix += header.dump();
  prefix.append((8 - prefix.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  const uint64_t header_len = prefix.size() - 8;
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>(header_len >> (8 * i));

  // Streamed tensor by tensor (not WriteStringToFile) so multi-GB tensors are not copied into one
  // string. An error leaves `path` untouched; the writer removes its temporary file.
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> writer, AtomicFileWriter::Create(path));
  KLS_RETURN_IF_ERROR(writer->Append(prefix));
  for (const TensorToWrite& t : tensors) KLS_RETURN_IF_ERROR(writer->Append(t.bytes));
  return writer->Commit();
}

}  // namespace kls::engine
