// Request validation of the worker (what reaches the engine), without a server.
#include "services/worker/worker_service.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/engine/tiny_model.h"

namespace kls::worker {
namespace {

using ::kls::testing::TinyModel;

kls::v1::WorkerGenerateRequest Request(std::vector<uint32_t> tokens) {
  kls::v1::WorkerGenerateRequest r;
  r.mutable_request()->set_session_id("s-1");
  for (uint32_t t : tokens) r.mutable_request()->add_input_tokens(t);
  return r;
}

absl::StatusOr<TurnParams> Validate(const kls::v1::WorkerGenerateRequest& r) {
  return ValidateGenerateRequest(r, *TinyModel().tokenizer, TinyModel().weights->config, 1000);
}

void ExpectInvalid(const kls::v1::WorkerGenerateRequest& r, const std::string& needle) {
  absl::StatusOr<TurnParams> p = Validate(r);
  ASSERT_FALSE(p.ok()) << needle;
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
  EXPECT_NE(std::string(p.status().message()).find(needle), std::string::npos) << p.status();
}

TEST(ValidateGenerateRequestTest, DefaultsAndStopTokens) {
  absl::StatusOr<TurnParams> p = Validate(Request({65, 66}));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->tenant, "default");
  EXPECT_EQ(p->input, (std::vector<int32_t>{65, 66}));
  EXPECT_EQ(p->sampler.temperature, 1.0f);
  EXPECT_EQ(p->sampler.top_p, 1.0f);
  EXPECT_EQ(p->max_tokens, 256);
  EXPECT_EQ(p->commit, kls::v1::COMMIT_POLICY_SYNC);
  const std::optional<int32_t> im_end = TinyModel().tokenizer->SpecialTokenId("<|im_end|>");
  ASSERT_TRUE(im_end.has_value());
  EXPECT_EQ(p->stop_token_ids, std::vector<int32_t>{*im_end});
  kls::v1::WorkerGenerateRequest r = Request({65});
  r.mutable_request()->mutable_sampling()->set_ignore_eos(true);
  r.mutable_request()->mutable_sampling()->set_temperature(0);
  r.mutable_request()->mutable_sampling()->set_seed(9);
  p = Validate(r);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->stop_token_ids.empty());
  EXPECT_EQ(p->sampler.temperature, 0.0f);
  EXPECT_EQ(p->sampler.seed, 9u);
}

TEST(ValidateGenerateRequestTest, MessagesAreRenderedWithTheChatFormat) {
  kls::v1::WorkerGenerateRequest r = Request({});
  kls::v1::Message* m = r.mutable_request()->add_messages();
  m->set_role("user");
  m->set_content("hello");
  absl::StatusOr<TurnParams> p = Validate(r);
  ASSERT_TRUE(p.ok()) << p.status();
  // <|im_user|>user<|im_middle|>hello<|im_end|><|im_assistant|>assistant<|im_middle|>
  EXPECT_GT(p->input.size(), 5u + 4u);
}

TEST(ValidateGenerateRequestTest, BadInputIsRefusedWithTheFieldNamed) {
  ExpectInvalid(Request({}), "empty");
  kls::v1::WorkerGenerateRequest both = Request({65});
  both.mutable_request()->add_messages()->set_role("user");
  ExpectInvalid(both, "not both");
  ExpectInvalid(Request({600}), "vocabulary");
  kls::v1::WorkerGenerateRequest utf8 = Request({});
  kls::v1::Message* m = utf8.mutable_request()->add_messages();
  m->set_role("user");
  m->set_content(std::string("a\xc3(b"));
  ExpectInvalid(utf8, "UTF-8");
  kls::v1::WorkerGenerateRequest id = Request({65});
  id.mutable_request()->set_session_id("a/b");
  ExpectInvalid(id, "session_id");
  id.mutable_request()->set_session_id(std::string(129, 'a'));
  ExpectInvalid(id, "session_id");

  auto with = [](auto set) {
    kls::v1::WorkerGenerateRequest r = Request({65});
    set(r.mutable_request()->mutable_sampling());
    return r;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  ExpectInvalid(with([](auto* s) { s->set_temperature(-0.5f); }), "temperature");
  ExpectInvalid(with([&](auto* s) { s->set_temperature(nan); }), "temperature");
  ExpectInvalid(with([&](auto* s) { s->set_temperature(inf); }), "temperature");
  ExpectInvalid(with([](auto* s) { s->set_top_p(0); }), "top_p");
  ExpectInvalid(with([](auto* s) { s->set_top_p(1.5f); }), "top_p");
  ExpectInvalid(with([&](auto* s) { s->set_top_p(nan); }), "top_p");
  ExpectInvalid(with([](auto* s) { s->set_top_k(-1); }), "top_k");
  ExpectInvalid(with([](auto* s) { s->set_max_tokens(0); }), "max_tokens");
  ExpectInvalid(with([](auto* s) { s->set_max_tokens(-3); }), "max_tokens");
  ExpectInvalid(with([](auto* s) { s->set_max_tokens(1001); }), "max_tokens");
  ExpectInvalid(with([](auto* s) { s->add_stop(""); }), "stop");
  ExpectInvalid(with([](auto* s) { s->add_stop_token_ids(100000); }), "stop_token_ids");
  kls::v1::WorkerGenerateRequest policy = Request({65});
  policy.mutable_request()->set_commit(static_cast<kls::v1::CommitPolicy>(42));
  ExpectInvalid(policy, "commit");
}

}  // namespace
}  // namespace kls::worker
