// What lowbit serve and lowbit run share: the model loaded for inference with its tokenizer,
// chat template and context size, and prompts built from chat messages.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/cli/common.h"
#include "lowbit/comm/comm.h"

namespace lowbit::cli {

struct ServingModel {
  LoadedModel loaded;
  std::unique_ptr<Tokenizer> tok;
  std::string name;  // the model file's name, reported as the model id
  std::string chat_template, chat_template_where;  // "" when the model has none
  int64_t ctx = 0;   // tokens per sequence
  const LlamaModel& model() const { return *loaded.model; }
};

// Loads for inference (packed weights stay packed; exactly-16-bit weights compacted on the CPU).
// ctx 0 picks min(2048, the model's max_seq_len); a larger ctx than max_seq_len is an error.
// tp: the ranks of a tensor-parallel run (cli/dist.h): the model is this rank's piece.
ServingModel load_serving_model(const std::string& model, const std::string& tokenizer, Device device, int64_t ctx,
                                comm::Communicator* tp = nullptr);

// Token ids of a chat (messages [{"role", "content"}]) rendered with the model's chat template,
// with the generation prompt appended. Throws lowbit::Error when the model has no chat template
// or the template refuses the messages.
std::vector<int> chat_prompt_ids(const ServingModel& m, const nlohmann::ordered_json& messages);

}  // namespace lowbit::cli
