// Model fingerprint: identifies the exact model a snapshot or a cache entry was made with.
#ifndef KLS_ENGINE_MODEL_FINGERPRINT_H_
#define KLS_ENGINE_MODEL_FINGERPRINT_H_

#include "common/hash.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"

namespace kls::engine {

// XXH3-128 over: a format tag; the canonical config (ModelConfigToJson of `config`); the tensor
// index (sorted names, dtypes, shapes); and the bytes of every tensor of at most 64 KiB (norm
// weights, biases, A_log, dt_bias ...). Large tensors are not read, so this is cheap (no page
// faults on the bulk of the weights) yet changes with any config, layout or small-tensor edit.
// Deterministic across runs and machines. Thread-safe (reads only).
kls::Hash128 ComputeModelFingerprint(const ModelConfig& config, const Checkpoint& checkpoint);

// Tensors up to this size contribute their content to the fingerprint.
inline constexpr size_t kFingerprintMaxContentBytes = 64 * 1024;

}  // namespace kls::engine

#endif  // KLS_ENGINE_MODEL_FINGERPRINT_H_
