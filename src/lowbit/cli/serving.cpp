#include "lowbit/cli/serving.h"

#include <filesystem>

#include "lowbit/cli/dist.h"

namespace lowbit::cli {

ServingModel load_serving_model(const std::string& model, const std::string& tokenizer, Device device, int64_t ctx,
                                comm::Communicator* tp) {
  ServingModel m;
  m.loaded = tp ? load_model_for_ranks(model, device, *tp, false, true) : load_model(model, device);
  compact_for_inference(m.loaded, device);
  if (tp) shard_for_tensor_parallel(m.loaded, *tp, device);
  m.tok = open_tokenizer(tokenizer, model);
  const int V = m.model().config().vocab_size;
  if (m.tok->vocab_size() > V)
    throw_error("tokenizer has ", m.tok->vocab_size(), " tokens but the model's vocabulary is ", V,
                ": they do not belong together");
  m.name = std::filesystem::path(model).filename().string();
  if (m.name.empty()) m.name = std::filesystem::path(model).parent_path().filename().string();
  m.chat_template = find_chat_template(tokenizer, model, &m.chat_template_where);
  const int64_t max_seq = m.model().config().max_seq_len;
  if (ctx > max_seq) throw_error("--ctx ", ctx, " is more than the model's context length ", max_seq);
  m.ctx = ctx > 0 ? ctx : std::min<int64_t>(2048, max_seq);
  return m;
}

std::vector<int> chat_prompt_ids(const ServingModel& m, const nlohmann::ordered_json& messages) {
  if (m.chat_template.empty())
    throw_error("the model ", m.name, " has no chat template (tokenizer.chat_template, chat_template.jinja or ",
                "tokenizer_config.json); use plain completions");
  const std::string text = render_chat(m.chat_template, m.chat_template_where, *m.tok, messages, true);
  // The template writes BOS itself where the model wants one; special tokens in it are parsed.
  return m.tok->encode(text, false);
}

}  // namespace lowbit::cli
