#include "engine/model/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

using ::testing::HasSubstr;

template <typename T>
std::string_view Bytes(const std::vector<T>& v) {
  return std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::string U64Le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A file with a hand-written header: 8-byte length, `header`, then `data`.
std::string RawFile(const std::string& header, const std::string& data) {
  return absl::StrCat(U64Le(header.size()), header, data);
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = kls::testing::MakeTempDir(); }
  void TearDown() override { kls::testing::RemoveTree(dir_); }

  std::string Path(const std::string& name) const { return absl::StrCat(dir_, "/", name); }

  void WriteRaw(const std::string& name, std::string_view contents) {
    ASSERT_TRUE(kls::WriteStringToFile(Path(name), contents).ok());
  }

  // Opens a hand-written file and expects `code` with a message containing `needle` and the path.
  void ExpectOpenError(const std::string& contents, absl::StatusCode code,
                       const std::string& needle) {
    WriteRaw("bad.safetensors", contents);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
        SafetensorsFile::Open(Path("bad.safetensors"));
    ASSERT_FALSE(f.ok()) << "accepted a file that should fail with: " << needle;
    EXPECT_EQ(f.status().code(), code) << f.status();
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(needle));
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(Path("bad.safetensors")));
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------------------------
// dtypes and conversions

TEST(DTypeTest, NamesAndSizes) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    absl::StatusOr<DType> parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  for (std::string bad : {"I64", "F8_E4M3", "f32", "", "BF16 "}) {
    absl::StatusOr<DType> parsed = ParseDType(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(parsed.status().message()),
                HasSubstr(absl::StrCat("unsupported dtype '", bad, "'")));
  }
}

float FromBits(uint32_t bits) { return std::bit_cast<float>(bits); }

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xC000);
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  // 1 + 2^-8 is exactly halfway between 0x3F80 and 0x3F81: ties go to the even 0x3F80.
  EXPECT_EQ(FloatToBf16(FromBits(0x3F808000)), 0x3F80);
  // Halfway between 0x3F81 (odd) and 0x3F82: ties go up to 0x3F82.
  EXPECT_EQ(FloatToBf16(FromBits(0x3F818000)), 0x3F82);
  // Just above / below halfway.
  EXPECT_EQ(FloatToBf16(FromBits(0x3F808001)), 0x3F81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3F807FFF)), 0x3F80);
  // Rounding carries into the exponent; the largest floats round to infinity.
  EXPECT_EQ(FloatToBf16(FromBits(0x3FFFFFFF)), 0x4000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  // Subnormals keep their bits.
  EXPECT_EQ(FloatToBf16(FromBits(0x00010000)), 0x0001);
}

TEST(Bf16Test, NanStaysNan) {
  // A signaling NaN whose payload lives only in the low 16 bits would truncate to infinity.
  for (uint32_t bits : {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu}) {
    const uint16_t b = FloatToBf16(FromBits(bits));
    EXPECT_TRUE(std::isnan(Bf16ToFloat(b))) << std::hex << bits;
    EXPECT_EQ(b & 0x8000, (bits >> 16) & 0x8000) << "sign kept";
  }
}

TEST(Bf16Test, EveryBf16RoundTrips) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), b << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f))));
    } else {
      ASSERT_EQ(FloatToBf16(f), b) << std::hex << b;
    }
  }
}

TEST(Bf16Test, MatchesNearestEvenReference) {
  std::mt19937 rng(1234);
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(static_cast<uint32_t>(rng()));
    if (!std::isfinite(f)) continue;
    // Reference: the nearer of the two bf16 neighbours (truncation and the next one up in
    // magnitude), measured in double; ties to the even one.
    const auto lo = static_cast<uint16_t>(std::bit_cast<uint32_t>(f) >> 16);
    const auto hi = static_cast<uint16_t>(lo + 1);
    const double dlo = std::fabs(double(f) - double(Bf16ToFloat(lo)));
    const double dhi = std::isinf(Bf16ToFloat(hi))
                           ? std::fabs(double(f) - std::ldexp(1.0, 128) * (f < 0 ? -1 : 1))
                           : std::fabs(double(f) - double(Bf16ToFloat(hi)));
    const uint16_t want = dlo < dhi ? lo : dhi < dlo ? hi : (lo & 1) ? hi : lo;
    ASSERT_EQ(FloatToBf16(f), want) << std::hex << std::bit_cast<uint32_t>(f);
  }
}

TEST(HalfTest, KnownValues) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3C00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xC000);
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7BFF);  // largest finite
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7BFF);  // below the halfway point to 65536
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);  // halfway: ties to even = infinity
  EXPECT_EQ(FloatToHalf(1e6f), 0x7C00);
  EXPECT_EQ(FloatToHalf(-1e6f), 0xFC00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(FromBits(0x7F800001)))));  // low-bit payload
  // Normal rounding: 1 + 2^-11 ties to even (1.0); 1 + 3 * 2^-11 ties up to 1 + 2^-9.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  // Subnormals: 2^-24 is the smallest; 2^-25 ties to even (0); 1.5 * 2^-24 ties up to 2 * 2^-24.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25) * 1.0001f), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -24)), 0x0002);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(FloatToHalf(-std::ldexp(1.0f, -30)), 0x8000);
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.0f, -24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14)), 0x0400);     // smallest normal
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x83FF), -std::ldexp(1023.0f, -24));
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(HalfToFloat(0xFC00), -std::numeric_limits<float>::infinity());
}

TEST(HalfTest, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const bool is_nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    ASSERT_EQ(std::isnan(f), is_nan) << std::hex << h;
    if (is_nan) {
      EXPECT_EQ(FloatToHalf(f) & 0x7E00, 0x7E00) << "quiet NaN";
    } else {
      ASSERT_EQ(FloatToHalf(f), h) << std::hex << h;
      // Independent decode: (-1)^s * 2^(e-15) * (1 + m/1024), or 2^-14 * m/1024 subnormal.
      const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
      const double mag = e == 0    ? std::ldexp(m, -24)
                         : e == 31 ? INFINITY
                                   : std::ldexp(1.0 + m / 1024.0, e - 15);
      ASSERT_EQ(double(f), (h & 0x8000) ? -mag : mag) << std::hex << h;
    }
  }
}

TEST(HalfTest, MatchesCompilerConversion) {
  // The compiler's _Float16 conversion (IEEE round-to-nearest-even) is the oracle.
  std::mt19937 rng(99);
  for (int i = 0; i < 200000; ++i) {
    // Exponents around the half range so subnormals, normals and overflow all occur.
    const float f = std::ldexp(std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng),
                               std::uniform_int_distribution<int>(-28, 17)(rng));
    const _Float16 ref = static_cast<_Float16>(f);
    ASSERT_EQ(FloatToHalf(f), std::bit_cast<uint16_t>(ref)) << f;
  }
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_F(SafetensorsTest, WritesAndReadsEveryDtype) {
  const std::vector<float> f32 = {1.5f, -2.25f, 0.0f, 3.0e-8f, 1.0e30f, -0.0f};
  std::vector<uint16_t> f16, bf16;
  const std::vector<float> src = {0.1f, -65504.0f, 1e-7f, 70000.0f, 3.14159f, -0.0f};
  for (float v : src) {
    f16.push_back(FloatToHalf(v));
    bf16.push_back(FloatToBf16(v));
  }
  const std::vector<TensorToWrite> tensors = {
      {"model.a.weight", DType::kF32, {2, 3}, Bytes(f32)},
      {"model.b.weight", DType::kF16, {6}, Bytes(f16)},
      {"model.c.weight", DType::kBF16, {3, 1, 2}, Bytes(bf16)},
  };
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), tensors, {{"format", "pt"}}).ok());

  absl::StatusOr<std::string> raw = kls::ReadFileToString(Path("model.safetensors"));
  ASSERT_TRUE(raw.ok());
  uint64_t header_len = 0;
  std::memcpy(&header_len, raw->data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(raw->size(), 8 + header_len + 6 * 4 + 6 * 2 + 6 * 2);
  EXPECT_EQ((*raw)[8], '{');

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("model.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  const std::vector<TensorView>& views = (*file)->tensors();
  ASSERT_EQ(views.size(), 3u);
  EXPECT_EQ(views[0].name, "model.a.weight");
  EXPECT_EQ(views[1].name, "model.b.weight");
  EXPECT_EQ(views[2].name, "model.c.weight");
  EXPECT_EQ(views[2].dtype, DType::kBF16);
  EXPECT_EQ(views[2].shape, (std::vector<int64_t>{3, 1, 2}));
  EXPECT_EQ(views[2].num_elements(), 6);
  EXPECT_EQ(views[2].num_bytes, 12u);
  EXPECT_EQ(std::memcmp(views[1].data, f16.data(), 12), 0);
  EXPECT_EQ((*file)->metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ((*file)->Find("model.b.weight"), &views[1]);
  EXPECT_EQ((*file)->Find("model.d.weight"), nullptr);

  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(),
            (std::vector<std::string>{"model.a.weight", "model.b.weight", "model.c.weight"}));
  std::vector<float> out(6);
  const std::vector<int64_t> shape_a = {2, 3}, shape_b = {6}, shape_c = {3, 1, 2};
  ASSERT_TRUE((*ckpt)->ReadFloat("model.a.weight", shape_a, out.data()).ok());
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(out[i]), std::bit_cast<uint32_t>(f32[i])) << i;
  }
  ASSERT_TRUE((*ckpt)->ReadFloat("model.b.weight", shape_b, out.data()).ok());
  EXPECT_FLOAT_EQ(out[0], 0.0999755859375f);  // nearest half to 0.1
  EXPECT_EQ(out[1], -65504.0f);
  EXPECT_EQ(out[2], std::ldexp(2.0f, -24));  // 1e-7 is subnormal in half: 1.68 × 2^-24 -> 2
  EXPECT_TRUE(std::isinf(out[3]));           // 70000 overflows half
  EXPECT_EQ(out[4], 3.140625f);
  EXPECT_TRUE(std::signbit(out[5]));
  ASSERT_TRUE((*ckpt)->ReadFloat("model.c.weight", shape_c, out.data()).ok());
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(out[i], Bf16ToFloat(FloatToBf16(src[i]))) << i;
    EXPECT_LE(std::fabs(out[i] - src[i]), std::fabs(src[i]) * std::ldexp(1.0f, -8)) << i;
  }
  EXPECT_EQ(out[3], 70144.0f);  // 70000 in bf16 (8-bit mantissa)
}

TEST_F(SafetensorsTest, ScalarsAndEmptyTensors) {
  const std::vector<float> scalar = {42.0f};
  const std::vector<TensorToWrite> tensors = {
      {"empty", DType::kBF16, {0, 3}, std::string_view()},
      {"scalar", DType::kF32, {}, Bytes(scalar)},
      {"empty2", DType::kF32, {4, 0}, std::string_view()},
  };
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), tensors).ok());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  float out = 0;
  ASSERT_TRUE((*ckpt)->ReadFloat("scalar", {}, &out).ok());
  EXPECT_EQ(out, 42.0f);
  const std::vector<int64_t> empty_shape = {0, 3};
  EXPECT_TRUE((*ckpt)->ReadFloat("empty", empty_shape, nullptr).ok());
  EXPECT_EQ((*ckpt)->Find("empty")->num_elements(), 0);
  EXPECT_EQ((*ckpt)->Find("empty2")->num_bytes, 0u);
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  const std::vector<float> six(6);
  {
    const std::vector<TensorToWrite> t = {{"w", DType::kF32, {2, 2}, Bytes(six)}};
    absl::Status s = WriteSafetensors(Path("x.safetensors"), t);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("tensor 'w': F32 [2, 2] needs 16 bytes, got 24"));
  }
  {
    const std::vector<TensorToWrite> t = {{"w", DType::kF32, {6}, Bytes(six)},
                                          {"w", DType::kF32, {3, 2}, Bytes(six)}};
    absl::Status s = WriteSafetensors(Path("x.safetensors"), t);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("tensor 'w' is given twice"));
  }
  {
    const std::vector<TensorToWrite> t = {{"w", DType::kF32, {-6}, Bytes(six)}};
    absl::Status s = WriteSafetensors(Path("x.safetensors"), t);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("shape [-6] is invalid"));
  }
  {
    const std::vector<TensorToWrite> t = {{"__metadata__", DType::kF32, {6}, Bytes(six)}};
    EXPECT_EQ(WriteSafetensors(Path("x.safetensors"), t).code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_FALSE(kls::FileExists(Path("x.safetensors")));
  // I/O errors name the path.
  const std::vector<TensorToWrite> ok = {{"w", DType::kF32, {6}, Bytes(six)}};
  absl::Status s = WriteSafetensors(Path("no/such/dir/x.safetensors"), ok);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("no/such/dir/x.safetensors"));
}

TEST_F(SafetensorsTest, OverwritesAtomically) {
  const std::vector<float> a = {1, 2}, b = {3, 4, 5};
  const std::vector<TensorToWrite> first = {{"w", DType::kF32, {2}, Bytes(a)}};
  const std::vector<TensorToWrite> second = {{"w", DType::kF32, {3}, Bytes(b)}};
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), first).ok());
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), second).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
      SafetensorsFile::Open(Path("model.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("w")->shape, std::vector<int64_t>{3});
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1) << "temporary file left behind";
}

TEST_F(SafetensorsTest, AcceptsHeadersFromOtherWriters) {
  // Key order in the JSON does not follow the data order, there is a gap, trailing padding,
  // extra per-tensor keys; tensors() is still sorted by offset.
  const std::string header =
      R"({"b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24], "extra": 1},)"
      R"( "a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}})"
      "      ";
  WriteRaw("ok.safetensors", RawFile(header, std::string(32, '\0')));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
      SafetensorsFile::Open(Path("ok.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ((*f)->tensors().size(), 2u);
  EXPECT_EQ((*f)->tensors()[0].name, "a");
  EXPECT_EQ((*f)->tensors()[1].name, "b");
  EXPECT_TRUE((*f)->metadata().empty());
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each check on its own.

TEST_F(SafetensorsTest, MissingFile) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
      SafetensorsFile::Open(Path("absent.safetensors"));
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("absent.safetensors"));
}

TEST_F(SafetensorsTest, FileShorterThanEightBytes) {
  ExpectOpenError("", absl::StatusCode::kDataLoss, "file is 0 bytes, shorter than the 8-byte");
  ExpectOpenError(std::string("\x10\0\0\0\0", 5), absl::StatusCode::kDataLoss, "file is 5 bytes");
}

TEST_F(SafetensorsTest, HeaderLengthLargerThanFile) {
  ExpectOpenError(absl::StrCat(U64Le(1000), "{}"), absl::StatusCode::kDataLoss,
                  "header length 1000 runs past the end of the 10-byte file");
}

TEST_F(SafetensorsTest, AbsurdHeaderLength) {
  ExpectOpenError(absl::StrCat(U64Le(uint64_t{1} << 40), "{}"), absl::StatusCode::kInvalidArgument,
                  "header length 1099511627776 exceeds the 100 MiB limit");
  ExpectOpenError(absl::StrCat(U64Le(~uint64_t{0}), "{}"), absl::StatusCode::kInvalidArgument,
                  "exceeds the 100 MiB limit");
}

TEST_F(SafetensorsTest, ZeroHeaderLength) {
  ExpectOpenError(absl::StrCat(U64Le(0), "{}"), absl::StatusCode::kInvalidArgument,
                  "header length is 0");
}

TEST_F(SafetensorsTest, HeaderNotJson) {
  ExpectOpenError(RawFile(R"({"a": {"dtype": "F32",)", ""), absl::StatusCode::kInvalidArgument,
                  "header is not valid JSON");
  ExpectOpenError(RawFile(std::string("{}\0\0\0", 5), ""), absl::StatusCode::kInvalidArgument,
                  "header is not valid JSON");
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  ExpectOpenError(RawFile("[1, 2, 3]", ""), absl::StatusCode::kInvalidArgument,
                  "header is a JSON array, expected an object");
  ExpectOpenError(RawFile("\"x\"", ""), absl::StatusCode::kInvalidArgument,
                  "header is a JSON string, expected an object");
}

TEST_F(SafetensorsTest, UnknownDtype) {
  ExpectOpenError(RawFile(R"({"ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})",
                          std::string(8, '\0')),
                  absl::StatusCode::kInvalidArgument, "tensor 'ids': unsupported dtype 'I64'");
  ExpectOpenError(RawFile(R"({"w8": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}})",
                          std::string(8, '\0')),
                  absl::StatusCode::kInvalidArgument, "tensor 'w8': unsupported dtype 'F8_E4M3'");
}

TEST_F(SafetensorsTest, ShapeSizeMismatch) {
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'w': data_offsets [0, 20) hold 20 bytes, but F32 [2, 3] needs 24");
}

TEST_F(SafetensorsTest, ShapeProductOverflow) {
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], )"
                          R"("data_offsets": [0, 0]}})",
                          ""),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'w': shape [4294967296, 4294967296] overflows");
}

TEST_F(SafetensorsTest, OffsetsOutOfRange) {
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kDataLoss,
                  "tensor 'w': data_offsets [0, 400) end past the 24-byte data section");
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'w': data_offsets [8, 4) has begin > end");
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'w': 'data_offsets' must be two non-negative");
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  ExpectOpenError(RawFile(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                          R"( "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'b': data_offsets [8, 24) overlap tensor 'a' (ending at 16)");
  // Unordered in the JSON and overlapping: still caught, whichever comes first.
  ExpectOpenError(RawFile(R"({"z": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                          R"( "y": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]},)"
                          R"( "x": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}})",
                          std::string(24, '\0')),
                  absl::StatusCode::kInvalidArgument,
                  "tensor 'y': data_offsets [4, 20) overlap tensor 'z'");
  // Two tensors on the same bytes.
  ExpectOpenError(RawFile(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                          R"( "b": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}})",
                          std::string(8, '\0')),
                  absl::StatusCode::kInvalidArgument, "overlap tensor 'a'");
}

TEST_F(SafetensorsTest, NegativeDims) {
  ExpectOpenError(
      RawFile(R"({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}})", ""),
      absl::StatusCode::kInvalidArgument,
      "tensor 'w': 'shape' has an invalid dimension -1 (dims must be >= 0)");
}

TEST_F(SafetensorsTest, TruncatedData) {
  std::vector<float> big(1000, 1.0f), small(10, 2.0f);
  const std::vector<TensorToWrite> tensors = {{"small", DType::kF32, {10}, Bytes(small)},
                                              {"big", DType::kF32, {1000}, Bytes(big)}};
  ASSERT_TRUE(WriteSafetensors(Path("cut.safetensors"), tensors).ok());
  const auto full = std::filesystem::file_size(Path("cut.safetensors"));
  std::filesystem::resize_file(Path("cut.safetensors"), full - 2000);  // middle of "big"
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
      SafetensorsFile::Open(Path("cut.safetensors"));
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(f.status().message()),
              HasSubstr("tensor 'big': data_offsets [40, 4040)"));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("truncated file?"));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("cut.safetensors"));
}

TEST_F(SafetensorsTest, WrongJsonTypes) {
  struct Case {
    std::string header;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"w": [0, 4]})", "tensor 'w': entry must be a JSON object (got array)"},
      {R"({"w": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}})",
       "tensor 'w': 'dtype' must be a string"},
      {R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", "tensor 'w': 'dtype' must be a string"},
      {R"({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}})",
       "tensor 'w': 'shape' must be an array of integers"},
      {R"({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}})",
       "tensor 'w': 'shape' must be an array of integers"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
       "tensor 'w': 'data_offsets' must be an array of two integers"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": {"b": 0}}})",
       "tensor 'w': 'data_offsets' must be an array of two integers"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}})",
       "tensor 'w': 'data_offsets' must be two non-negative integers, got [string, string]"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [[[0]], 4]}})",
       "tensor 'w': 'data_offsets' must be two non-negative integers, got [array, 4]"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, {"e": [4]}]}})",
       "tensor 'w': 'data_offsets' must be two non-negative integers, got [0, object]"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, -4]}})",
       "tensor 'w': 'data_offsets' must be two non-negative integers, got [0, -4]"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.5]}})",
       "tensor 'w': 'data_offsets' must be two non-negative integers, got [0, 4.5]"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551615]}})",
       "got [0, 18446744073709551615]"},
      {R"({"w": {"dtype": "F32", "shape": [-9223372036854775808], "data_offsets": [0, 4]}})",
       "tensor 'w': 'shape' has an invalid dimension -9223372036854775808"},
      {R"({"__metadata__": ["format", "pt"]})", "__metadata__ must be a JSON object"},
      {R"({"__metadata__": {"format": 1}})", "__metadata__ value of 'format' must be a string"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    ExpectOpenError(RawFile(c.header, std::string(4, '\0')), absl::StatusCode::kInvalidArgument,
                    c.message);
  }
}

// Error messages must not dump() attacker-controlled JSON: it recurses once per nesting level.
TEST_F(SafetensorsTest, DeeplyNestedOffsetsDoNotOverflowTheStack) {
  constexpr size_t kDepth = 1'000'000;
  const std::string header =
      absl::StrCat(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [)",
                   std::string(kDepth, '['), "0", std::string(kDepth, ']'), ", 4]}}");
  ExpectOpenError(RawFile(header, std::string(4, '\0')), absl::StatusCode::kInvalidArgument,
                  "tensor 'w': 'data_offsets' must be two non-negative integers, got [array, 4]");
}

TEST_F(SafetensorsTest, RepeatedTensorName) {
  ExpectOpenError(RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                          R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                          std::string(8, '\0')),
                  absl::StatusCode::kInvalidArgument, "header repeats the key 'w'");
}

// ---------------------------------------------------------------------------------------------
// Checkpoint directories

class CheckpointTest : public SafetensorsTest {
 protected:
  // Two shards: shard 1 holds "a" (F32 [2, 2]) and "c" (BF16 [3]); shard 2 holds "b" (F16 [4]).
  void WriteShards() {
    a_ = {1, 2, 3, 4};
    for (float v : {0.5f, -1.0f, 2.0f}) c_.push_back(FloatToBf16(v));
    for (float v : {1.0f, 2.0f, 3.0f, -4.0f}) b_.push_back(FloatToHalf(v));
    const std::vector<TensorToWrite> shard1 = {{"a", DType::kF32, {2, 2}, Bytes(a_)},
                                               {"c", DType::kBF16, {3}, Bytes(c_)}};
    const std::vector<TensorToWrite> shard2 = {{"b", DType::kF16, {4}, Bytes(b_)}};
    ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"), shard1).ok());
    ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"), shard2).ok());
  }
  void WriteIndex(const std::string& weight_map) {
    WriteRaw("model.safetensors.index.json",
             absl::StrCat(R"({"metadata": {"total_size": 28}, "weight_map": )", weight_map, "}"));
  }
  void ExpectCheckpointError(absl::StatusCode code, const std::string& needle) {
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
    ASSERT_FALSE(ckpt.ok()) << "accepted a checkpoint that should fail with: " << needle;
    EXPECT_EQ(ckpt.status().code(), code) << ckpt.status();
    EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr(needle));
  }
  static constexpr char kGoodMap[] =
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",)"
      R"( "c": "model-00001-of-00002.safetensors"})";

  std::vector<float> a_;
  std::vector<uint16_t> b_, c_;
};

TEST_F(CheckpointTest, TwoShardsLoadAsOne) {
  WriteShards();
  WriteIndex(kGoodMap);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"a", "b", "c"}));
  std::vector<float> out(4);
  const std::vector<int64_t> shape_a = {2, 2}, shape_b = {4}, shape_c = {3};
  ASSERT_TRUE((*ckpt)->ReadFloat("a", shape_a, out.data()).ok());
  EXPECT_EQ(out, a_);
  ASSERT_TRUE((*ckpt)->ReadFloat("b", shape_b, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{1.0f, 2.0f, 3.0f, -4.0f}));
  ASSERT_TRUE((*ckpt)->ReadFloat("c", shape_c, out.data()).ok());
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[2], 2.0f);
  EXPECT_EQ((*ckpt)->Find("zzz"), nullptr);
  ASSERT_NE((*ckpt)->Find("b"), nullptr);
  EXPECT_EQ((*ckpt)->Find("b")->dtype, DType::kF16);
}

TEST_F(CheckpointTest, IndexWinsOverSingleFile) {
  WriteShards();
  WriteIndex(kGoodMap);
  const std::vector<float> other = {9};
  const std::vector<TensorToWrite> t = {{"other", DType::kF32, {1}, Bytes(other)}};
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), t).ok());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->Find("other"), nullptr);
}

TEST_F(CheckpointTest, NeitherFileExists) {
  ExpectCheckpointError(absl::StatusCode::kNotFound, "model.safetensors.index.json nor ");
  ExpectCheckpointError(absl::StatusCode::kNotFound, dir_ + "/model.safetensors exists");
}

TEST_F(CheckpointTest, MissingShardFile) {
  WriteShards();
  WriteIndex(
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00003-of-00003.safetensors"})");
  ExpectCheckpointError(absl::StatusCode::kNotFound, "shard 'model-00003-of-00003.safetensors'");
}

TEST_F(CheckpointTest, TensorMissingFromItsShard) {
  WriteShards();
  WriteIndex(
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"})");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument,
                        "tensor 'b' is mapped to shard 'model-00001-of-00002.safetensors', which "
                        "does not contain it");
}

TEST_F(CheckpointTest, TensorInTwoShards) {
  WriteShards();
  const std::vector<float> dup = {1, 2, 3, 4};
  const std::vector<TensorToWrite> t = {{"a", DType::kF32, {4}, Bytes(dup)}};
  ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"), t).ok());
  WriteIndex(
      R"({"a": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"})");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument,
                        "tensor 'a' is in two shards: 'model-00001-of-00002.safetensors' and "
                        "'model-00002-of-00002.safetensors'");
}

TEST_F(CheckpointTest, ShardNamesMustBePlainFileNames) {
  WriteShards();
  for (std::string bad : {"../model-00001-of-00002.safetensors",
                          "/etc/model-00001-of-00002.safetensors", "..", ".", "sub/x", ""}) {
    SCOPED_TRACE(bad);
    WriteIndex(absl::StrCat(R"({"a": ")", bad, R"("})"));
    ExpectCheckpointError(absl::StatusCode::kInvalidArgument,
                          absl::StrCat("shard '", bad, "' of tensor 'a' is not a plain file name"));
  }
}

TEST_F(CheckpointTest, MalformedIndex) {
  WriteShards();
  WriteRaw("model.safetensors.index.json", "{");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument, "index.json: not a JSON object");
  WriteRaw("model.safetensors.index.json", R"({"metadata": {}})");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument, "'weight_map' must be a JSON object");
  WriteIndex("{}");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument, "'weight_map' is empty");
  WriteIndex(R"({"a": 1})");
  ExpectCheckpointError(absl::StatusCode::kInvalidArgument,
                        "weight_map entry of tensor 'a' must be a string");
}

TEST_F(CheckpointTest, BadShardErrorNamesShard) {
  WriteShards();
  WriteRaw("model-00002-of-00002.safetensors", "abc");
  WriteIndex(kGoodMap);
  ExpectCheckpointError(absl::StatusCode::kDataLoss, "shard 'model-00002-of-00002.safetensors': ");
}

TEST_F(CheckpointTest, ReadFloatChecksNameAndShape) {
  WriteShards();
  WriteIndex(kGoodMap);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::vector<float> out(4, -7.0f);
  const std::vector<int64_t> wrong = {4, 1}, right = {2, 2};
  absl::Status s = (*ckpt)->ReadFloat("a", wrong, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "tensor 'a' has shape [2, 2], expected [4, 1]");
  EXPECT_EQ(out, std::vector<float>(4, -7.0f)) << "output touched on error";
  s = (*ckpt)->ReadFloat("model.missing", right, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "missing tensor 'model.missing'");
}

TEST_F(SafetensorsTest, IgnoreUnitDims) {
  // A_log is stored [1, 1, H, 1] and read as [H].
  const std::vector<float> a_log = {0.1f, 0.2f, 0.3f, 0.4f};
  const std::vector<TensorToWrite> t = {{"A_log", DType::kF32, {1, 1, 4, 1}, Bytes(a_log)}};
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), t).ok());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::vector<float> out(4);
  const std::vector<int64_t> h = {4}, h1 = {4, 1}, five = {5}, two_two = {2, 2};
  EXPECT_TRUE((*ckpt)->ReadFloat("A_log", h, out.data(), ShapeMatch::kIgnoreUnitDims).ok());
  EXPECT_EQ(out, a_log);
  EXPECT_TRUE((*ckpt)->ReadFloat("A_log", h1, out.data(), ShapeMatch::kIgnoreUnitDims).ok());
  absl::Status exact = (*ckpt)->ReadFloat("A_log", h, out.data());
  EXPECT_EQ(exact.message(), "tensor 'A_log' has shape [1, 1, 4, 1], expected [4]");
  absl::Status wrong = (*ckpt)->ReadFloat("A_log", five, out.data(), ShapeMatch::kIgnoreUnitDims);
  EXPECT_EQ(wrong.message(),
            "tensor 'A_log' has shape [1, 1, 4, 1], expected [5] (ignoring size-1 dims)");
  EXPECT_FALSE((*ckpt)->ReadFloat("A_log", two_two, out.data(), ShapeMatch::kIgnoreUnitDims).ok());
}

}  // namespace
}  // namespace kls::engine
