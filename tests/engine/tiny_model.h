// A tiny random model written once per test binary into a temp dir, for engine tests.
#ifndef KLS_TESTS_ENGINE_TINY_MODEL_H_
#define KLS_TESTS_ENGINE_TINY_MODEL_H_

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/model/make_model.h"
#include "engine/scheduler/generator.h"
#include "tests/test_util.h"

namespace kls::testing {

// Temp dirs made for models, removed when the test binary exits.
inline std::vector<std::string>& ModelDirsToRemove() {
  static auto* dirs = [] {
    auto* d = new std::vector<std::string>();
    std::atexit([] {
      for (const std::string& dir : ModelDirsToRemove()) RemoveTree(dir);
    });
    return d;
  }();
  return *dirs;
}

// A fresh temp dir, removed when the test binary exits.
inline std::string ScratchDir() {
  std::string dir = MakeTempDir();
  ModelDirsToRemove().push_back(dir);
  return dir;
}

// Writes the preset (f32 weights unless told otherwise; MakeModelOptions for the rest) to a
// fresh temp dir; returns the dir.
inline std::string WriteModel(const std::string& preset, uint64_t seed,
                              engine::DType dtype = engine::DType::kF32,
                              int64_t max_shard_bytes = 0, double residual_scale = 1.0) {
  const std::string dir = ScratchDir() + "/" + preset;
  absl::StatusOr<engine::ModelConfig> config = engine::PresetConfig(preset);
  EXPECT_TRUE(config.ok()) << config.status();
  engine::MakeModelOptions options;
  options.out_dir = dir;
  options.seed = seed;
  options.dtype = dtype;
  options.max_shard_bytes = max_shard_bytes;
  options.residual_scale = residual_scale;
  absl::Status s = engine::MakeModel(*config, options);
  EXPECT_TRUE(s.ok()) << s;
  return dir;
}

// The tiny model, loaded once per process.
inline const engine::LoadedModel& TinyModel() {
  static const engine::LoadedModel* model = [] {
    absl::StatusOr<engine::LoadedModel> m = engine::LoadModel(WriteModel("tiny", 7));
    EXPECT_TRUE(m.ok()) << m.status();
    return new engine::LoadedModel(*std::move(m));
  }();
  return *model;
}

}  // namespace kls::testing

#endif  // KLS_TESTS_ENGINE_TINY_MODEL_H_
