// The stories260K fixture of the one-stage QAT method tests (l4q, lr-qat): a small configuration and
// the two checks every such method passes — it trains, beats round-to-nearest and reloads; stopped
// and resumed it gives the same model.
#pragma once
#include <filesystem>
#include <functional>
#include <string>

#include "common/stories_fixture.h"
#include "common/test_util.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/train/qat.h"

namespace lowbit::test {

struct QatStoriesBase : StoriesPtq {
  // 12 steps of 2 x 64 tokens: each run takes a second or two.
  QatConfig small(const char* format = "int2g64") const {
    QatConfig c;
    c.format = &parse_quant_format(format);
    c.steps = 12;
    c.batch = 2;
    c.seqlen = 64;
    c.progress = false;
    return c;
  }

  // `method` with small(): one stage named after it whose loss falls over all its tokens, every
  // linear packed (no adapter left), perplexity below round-to-nearest's, and the saved checkpoint
  // reloads to the same perplexity. `more` checks the result further.
  void expect_trains_beats_rtn_and_reloads(const std::string& method,
                                           const std::function<void(const QatResult&)>& more = {}) const {
    Checkpoint ck = load_llama2c(model_path);
    LlamaModel fp(ck.config, ck.weights);
    const QatConfig c = small();
    QatResult r = make_qat_method(method, c)->run(fp, calib_stream);
    ASSERT_TRUE(r.complete);
    ASSERT_EQ(r.stages.size(), 1u);
    EXPECT_EQ(r.stages[0].name, method);
    EXPECT_LT(r.stages[0].loss_after, r.stages[0].loss_before);
    EXPECT_EQ(r.stages[0].tokens, c.steps * c.batch * c.seqlen);
    if (more) more(r);
    ASSERT_TRUE(r.model);
    packed(*r.model);
    const QuantFormat& f = *c.format;
    const double p = ppl(*r.model);
    EXPECT_LT(p, ppl(*rtn_model(ck, f)));
    const auto dir = temp_dir("qat-" + method + "-save");
    save_quantized_model(dir.string(), *r.model, method, f);
    auto loaded = make_quantized_model(load_quantized_model(dir.string(), false));
    EXPECT_NEAR(ppl(*loaded), p, 1e-3 * p);
    std::filesystem::remove_all(dir);
  }

  // `method` at int3g64 stopped after 5 steps and resumed gives the same packed model and final loss
  // as one uninterrupted run; the state with `change` applied to the configuration is refused.
  void expect_resume_gives_the_same_model(const std::string& method, const std::function<void(QatConfig&)>& change) const {
    Checkpoint ck = load_llama2c(model_path);
    LlamaModel fp(ck.config, ck.weights);
    const auto dir = temp_dir("qat-" + method + "-resume");
    QatConfig c = small("int3g64");
    c.state_dir = (dir / "state").string();
    c.stop_after_steps = 5;
    QatResult a = make_qat_method(method, c)->run(fp, calib_stream);
    ASSERT_FALSE(a.complete);
    EXPECT_FALSE(a.model);
    ASSERT_TRUE(std::filesystem::exists(dir / "state" / (method + ".safetensors")));
    c.stop_after_steps = 0;
    QatResult b = make_qat_method(method, c)->run(fp, calib_stream);
    ASSERT_TRUE(b.complete);
    EXPECT_EQ(b.stages[0].resumed_from, 5);
    QatResult whole = make_qat_method(method, small("int3g64"))->run(fp, calib_stream);
    expect_same_packed(*b.model, *whole.model);
    EXPECT_EQ(b.stages[0].loss_after, whole.stages[0].loss_after);
    QatConfig other = c;
    change(other);
    EXPECT_THROW(make_qat_method(method, other)->run(fp, calib_stream), Error);
    std::filesystem::remove_all(dir);
  }
};

}  // namespace lowbit::test
