// Tokenizer files for synthetic models (`kls make-model`): a byte-level tiktoken.model and a Kimi
// tokenizer_config.json whose special tokens sit at the same offsets as the real model's.
#ifndef KLS_ENGINE_TOKENIZER_VOCAB_FILES_H_
#define KLS_ENGINE_TOKENIZER_VOCAB_FILES_H_

#include <cstdint>
#include <string>

namespace kls::engine {

// tiktoken.model text with 256 lines "base64(byte b) b", b = 0..255: every byte is its own token
// and nothing merges. Loads with Tokenizer::FromContents (num_ranks 256).
std::string MakeByteLevelTiktokenModel();

// tokenizer_config.json text for a vocabulary of `num_ranks` mergeable tokens: added_tokens_decoder
// names all 256 special slots num_ranks .. num_ranks + 255 with the Kimi-K2 table (offset 0 [BOS],
// 1 [EOS], 2 <|im_end|>, 3 <|im_user|>, 4 <|im_assistant|>, 6 <|start_header_id|>,
// 7 <|end_header_id|>, 9 [EOT], 10 <|im_system|>, 11 <|tool_calls_section_begin|>,
// 12 <|tool_calls_section_end|>, 13 <|tool_call_begin|>, 14 <|tool_call_argument_begin|>,
// 15 <|tool_call_end|>, 17 <|im_middle|>, 18..21 <|media_begin|> <|media_content|> <|media_end|>
// <|media_pad|>, 22 <think>, 23 </think>, 254 [UNK], 255 [PAD]; any other slot
// <|reserved_token_<id>|>), bos_token [BOS], eos_token [EOS], unk_token [UNK], pad_token [PAD].
// With num_ranks = 163584 this is the real model's table ([BOS] 163584, <|im_end|> 163586).
// `num_ranks` must be positive.
std::string MakeKimiTokenizerConfigJson(int64_t num_ranks);

}  // namespace kls::engine

#endif  // KLS_ENGINE_TOKENIZER_VOCAB_FILES_H_
