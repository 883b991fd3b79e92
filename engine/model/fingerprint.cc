#include "engine/model/fingerprint.h"

#include <string>
#include <vector>

namespace kls::engine {

kls::Hash128 ComputeModelFingerprint(const ModelConfig& config, const Checkpoint& checkpoint) {
  kls::Hasher128 hasher;
  // Bump the tag when the recipe changes, so old and new fingerprints never collide.
  hasher.Add("kls-model-fingerprint-v1");
  hasher.Add(ModelConfigToJson(config));
  const std::vector<std::string> names = checkpoint.TensorNames();
  hasher.AddU64(names.size());
  for (const std::string& name : names) {
    const TensorView* t = checkpoint.Find(name);
    hasher.Add(name);
    hasher.Add(DTypeName(t->dtype));
    hasher.AddU64(t->shape.size());
    for (int64_t d : t->shape) hasher.AddU64(static_cast<uint64_t>(d));
    const bool with_content = t->num_bytes <= kFingerprintMaxContentBytes;
    hasher.AddU64(with_content ? 1 : 0);
    if (with_content) hasher.Add(t->data, t->num_bytes);
  }
  return hasher.Finish();
}

}  // namespace kls::engine
