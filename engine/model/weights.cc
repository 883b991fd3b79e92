#include "engine/model/weights.h"

#include <unistd.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/model/fingerprint.h"

namespace kls::engine {
namespace {

void BindSwiGlu(const std::string& prefix, const char* gate, const char* up, const char* down,
                int64_t width, int64_t hidden, SwiGluWeights* w, std::vector<WeightBinding>* out) {
  out->push_back({absl::StrCat(prefix, gate, ".weight"),
                  {width, hidden},
                  WeightInit::kLinear,
                  ShapeMatch::kExact,
                  false,
                  &w->gate});
  out->push_back({absl::StrCat(prefix, up, ".weight"),
                  {width, hidden},
                  WeightInit::kLinear,
                  ShapeMatch::kExact,
                  false,
                  &w->up});
  out->push_back({absl::StrCat(prefix, down, ".weight"),
                  {hidden, width},
                  WeightInit::kLinear,
                  ShapeMatch::kExact,
                  false,
                  &w->down});
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t PhysicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0;
}

}  // namespace

std::vector<WeightBinding> BindWeights(ModelWeights* weights) {
  const ModelConfig& c = weights->config;
  const int64_t d = c.hidden_size;
  const int64_t h = c.linear_attn_config.num_heads;
  const int64_t k = c.linear_attn_config.head_dim;
  const int64_t hk = h * k;
  const int64_t w = c.linear_attn_config.short_conv_kernel_size;
  const int64_t nh = c.num_attention_heads;
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int64_t dc = c.kv_lora_rank;
  const int64_t e = c.num_experts;
  const int64_t im = c.moe_intermediate_size;

  std::vector<WeightBinding> out;
  out.push_back({"model.embed_tokens.weight",
                 {c.vocab_size, d},
                 WeightInit::kEmbedding,
                 ShapeMatch::kExact,
                 false,
                 &weights->embed});

  if (static_cast<int>(weights->layers.size()) != c.num_hidden_layers) {
    weights->layers.assign(c.num_hidden_layers, LayerWeights{});
  }
  int kda_slot = 0, mla_slot = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = weights->layers[i];
    L.kind = c.layer_kind(i);
    L.ffn = c.ffn_kind(i);
    L.state_slot = L.kind == LayerKind::kKda ? kda_slot++ : mla_slot++;
    const std::string p = absl::StrCat("model.layers.", i, ".");
    out.push_back({p + "input_layernorm.weight",
                   {d},
                   WeightInit::kNorm,
                   ShapeMatch::kExact,
                   false,
                   &L.input_norm});
    const std::string a = p + "self_attn.";
    if (L.kind == LayerKind::kKda) {
      KdaLayerWeights& K = L.kda;
      auto lin = [&](const char* name, int64_t rows, int64_t cols, std::vector<float>* dst) {
        out.push_back({a + name + ".weight",
                       {rows, cols},
                       WeightInit::kLinear,
                       ShapeMatch::kExact,
                       false,
                       dst});
      };
      lin("q_proj", hk, d, &K.q_proj);
      lin("k_proj", hk, d, &K.k_proj);
      lin("v_proj", hk, d, &K.v_proj);
      for (auto [name, dst] : {std::pair{"q_conv1d", &K.q_conv}, std::pair{"k_conv1d", &K.k_conv},
                               std::pair{"v_conv1d", &K.v_conv}}) {
        out.push_back(
            {a + name + ".weight", {hk, 1, w}, WeightInit::kConv, ShapeMatch::kExact, false, dst});
      }
      lin("f_a_proj", k, d, &K.f_a_proj);
      lin("f_b_proj", hk, k, &K.f_b_proj);
      out.push_back(
          {a + "dt_bias", {hk}, WeightInit::kDtBias, ShapeMatch::kExact, true, &K.dt_bias});
      out.push_back({a + "A_log",
                     {1, 1, h, 1},
                     WeightInit::kALog,
                     ShapeMatch::kIgnoreUnitDims,
                     true,
                     &K.a_log});
      lin("b_proj", h, d, &K.b_proj);
      lin("g_a_proj", k, d, &K.g_a_proj);
      lin("g_b_proj", hk, k, &K.g_b_proj);
      out.push_back(
          {a + "o_norm.weight", {k}, WeightInit::kNorm, ShapeMatch::kExact, false, &K.o_norm});
      lin("o_proj", d, hk, &K.o_proj);
    } else {
      MlaLayerWeights& M = L.mla;
      out.push_back({a + "q_proj.weight",
                     {nh * (dn + dr), d},
                     WeightInit::kLinear,
                     ShapeMatch::kExact,
                     false,
                     &M.q_proj});
      out.push_back({a + "kv_a_proj_with_mqa.weight",
                     {dc + dr, d},
                     WeightInit::kLinear,
                     ShapeMatch::kExact,
                     false,
                     &M.kv_a_proj});
      out.push_back({a + "kv_a_layernorm.weight",
                     {dc},
                     WeightInit::kNorm,
                     ShapeMatch::kExact,
                     false,
                     &M.kv_a_layernorm});
      out.push_back({a + "kv_b_proj.weight",
                     {nh * (dn + dv), dc},
                     WeightInit::kLinear,
                     ShapeMatch::kExact,
                     false,
                     &M.kv_b_proj});
      out.push_back({a + "o_proj.weight",
                     {d, nh * dv},
                     WeightInit::kLinear,
                     ShapeMatch::kExact,
                     false,
                     &M.o_proj});
    }
    out.push_back({p + "post_attention_layernorm.weight",
                   {d},
                   WeightInit::kNorm,
                   ShapeMatch::kExact,
                   false,
                   &L.post_attn_norm});
    if (L.ffn == FfnKind::kDense) {
      BindSwiGlu(p + "mlp.", "gate_proj", "up_proj", "down_proj", c.intermediate_size, d, &L.mlp,
                 &out);
    } else {
      MoeWeights& M = L.moe;
      const std::string m = p + "block_sparse_moe.";
      out.push_back(
          {m + "gate.weight", {e, d}, WeightInit::kLinear, ShapeMatch::kExact, false, &M.router});
      out.push_back({m + "gate.e_score_correction_bias",
                     {e},
                     WeightInit::kRouterBias,
                     ShapeMatch::kExact,
                     true,
                     &M.correction_bias});
      M.experts.resize(e);  // keeps loaded experts
      for (int64_t x = 0; x < e; ++x) {
        BindSwiGlu(absl::StrCat(m, "experts.", x, "."), "w1", "w3", "w2", im, d, &M.experts[x],
                   &out);
      }
      BindSwiGlu(m + "shared_experts.", "gate_proj", "up_proj", "down_proj",
                 im * c.num_shared_experts, d, &M.shared, &out);
    }
  }
  out.push_back({"model.norm.weight",
                 {d},
                 WeightInit::kNorm,
                 ShapeMatch::kExact,
                 false,
                 &weights->final_norm});
  out.push_back({"lm_head.weight",
                 {c.vocab_size, d},
                 WeightInit::kLinear,
                 ShapeMatch::kExact,
                 false,
                 &weights->lm_head});
  return out;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& model_dir) {
  auto weights = std::make_unique<ModelWeights>();
  KLS_ASSIGN_OR_RETURN(weights->config, LoadModelConfig(model_dir));
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  std::vector<WeightBinding> bindings = BindWeights(weights.get());

  // Check every tensor's presence and size before allocating anything, then the total against
  // this machine's memory, so a bad or too-large checkpoint fails cleanly instead of aborting.
  int64_t total_bytes = 0;
  for (const WeightBinding& b : bindings) {
    const TensorView* t = checkpoint->Find(b.name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": missing tensor '", b.name, "'"));
    }
    if (t->num_elements() != NumElements(b.shape)) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": tensor '", b.name,
                                                     "' has shape ", ShapeString(t->shape),
                                                     ", expected ", ShapeString(b.shape)));
    }
    total_bytes += NumElements(b.shape) * static_cast<int64_t>(sizeof(float));
  }
  const int64_t memory = PhysicalMemoryBytes();
  if (memory > 0 && total_bytes > memory / 10 * 9) {
    return absl::ResourceExhaustedError(
        absl::StrCat(model_dir, ": the CPU backend holds weights in fp32 and this model needs ",
                     total_bytes >> 20, " MiB; this machine has ", memory >> 20, " MiB"));
  }

  std::set<std::string> bound;
  for (const WeightBinding& b : bindings) {
    b.dest->resize(static_cast<size_t>(NumElements(b.shape)));
    absl::Status s = checkpoint->ReadFloat(b.name, b.shape, b.dest->data(), b.match);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat(model_dir, ": ", s.message()));
    }
    bound.insert(b.name);
  }
  int extra = 0;
  for (const std::string& name : checkpoint->TensorNames()) {
    if (!bound.count(name)) {
      if (extra++ < 5) KLS_LOG(WARNING) << "ignoring tensor not used by the model: " << name;
    }
  }
  if (extra > 5) KLS_LOG(WARNING) << "ignoring " << extra << " unused tensors in total";
  weights->fingerprint = ComputeModelFingerprint(weights->config, *checkpoint);
  return weights;
}

}  // namespace kls::engine
