// Searched activation clip ratios (methods/act_clip.h): the objective and the grid search on a
// worked example, per-(layer, point) ratios in the model (all equal = one fixed ratio; one point
// changed moves the logits and decoding through the cache agrees), the search on a small model,
// and the checkpoint record reloading to identical outputs.
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/act_clip.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/quant/format.h"

using namespace lowbit;

// int4 symmetric per token (7 codes a side), W = identity: the objective is || Q_c(x) - x ||^2.
//   x = [8, 3 x 7]: clip 1 -> step 8/7, 3 -> 3 codes = 24/7 (error 3/7 each, 7 * 9/49 = 9/7);
//                   clip 0.875 -> step 1, the 3s exact, 8 clamps to 7 (error 1)  => 0.875 wins.
//   x = [8, 1 x 7]: clip 1 -> 1 -> 1 code = 8/7 (7 * 1/49 = 1/7); clip 0.875 -> error 1 => 1 wins.
// A reader W = 2 I multiplies the objective by 4; two readers add.
TEST(ActClip, WorkedExample) {
  const ActQuantSpec int4 = parse_act_quant("int4");
  const Tensor eye = Tensor::from_vector(std::vector<float>{1, 0, 0, 0, 0, 0, 0, 0,  //
                                                            0, 1, 0, 0, 0, 0, 0, 0,  //
                                                            0, 0, 1, 0, 0, 0, 0, 0,  //
                                                            0, 0, 0, 1, 0, 0, 0, 0,  //
                                                            0, 0, 0, 0, 1, 0, 0, 0,  //
                                                            0, 0, 0, 0, 0, 1, 0, 0,  //
                                                            0, 0, 0, 0, 0, 0, 1, 0,  //
                                                            0, 0, 0, 0, 0, 0, 0, 1},
                                         {8, 8});
  Tensor two = eye.clone();
  for (int64_t i = 0; i < 64; ++i) two.data<float>()[i] *= 2;
  const Tensor x3 = Tensor::from_vector(std::vector<float>{8, 3, 3, 3, 3, 3, 3, 3}, {1, 8});
  const Tensor x1 = Tensor::from_vector(std::vector<float>{8, 1, 1, 1, 1, 1, 1, 1}, {1, 8});
  EXPECT_NEAR(act_clip_error(x3, {&eye}, int4, 1.0), 9.0 / 7.0, 1e-5);
  EXPECT_NEAR(act_clip_error(x3, {&eye}, int4, 0.875), 1.0, 1e-5);
  EXPECT_NEAR(act_clip_error(x1, {&eye}, int4, 1.0), 1.0 / 7.0, 1e-5);
  EXPECT_NEAR(act_clip_error(x1, {&eye}, int4, 0.875), 1.0, 1e-5);
  EXPECT_NEAR(act_clip_error(x3, {&two}, int4, 1.0), 4 * 9.0 / 7.0, 1e-4);
  EXPECT_NEAR(act_clip_error(x3, {&eye, &two}, int4, 0.875), 5.0, 1e-4);
  double err = 0;
  EXPECT_EQ(search_point_clip(x3, {&eye}, int4, {1.0, 0.875}, &err), 0.875);
  EXPECT_NEAR(err, 1.0, 1e-5);
  EXPECT_EQ(search_point_clip(x1, {&eye}, int4, {1.0, 0.875}, &err), 1.0);
  EXPECT_NEAR(err, 1.0 / 7.0, 1e-5);
  // Both rows together: 9/7 + 1/7 at clip 1 against 2 at 0.875.
  const Tensor both = Tensor::from_vector(std::vector<float>{8, 3, 3, 3, 3, 3, 3, 3, 8, 1, 1, 1, 1, 1, 1, 1}, {2, 8});
  EXPECT_EQ(search_point_clip(both, {&eye}, int4, {0.875, 1.0}, &err), 1.0);
  EXPECT_NEAR(err, 10.0 / 7.0, 1e-5);
  EXPECT_THROW(act_clip_error(x3, {&eye}, int4, 0.0), Error);
  EXPECT_THROW(act_clip_error(x3, {&eye}, ActQuantSpec{}, 1.0), Error);
  const Tensor narrow = Tensor::zeros({8, 4});
  EXPECT_THROW(act_clip_error(x3, {&narrow}, int4, 1.0), Error);
  EXPECT_THROW(search_point_clip(x3, {&eye}, int4, {}), Error);
}

TEST(ActClip, PerPointRatiosInTheModel) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaModel m(c, random_weights(c, 5, 0.2));
  const Tensor tok = Tensor::from_vector(std::vector<int32_t>{1, 7, 3, 9, 12, 4, 2, 8, 5, 11}, {1, 10});
  ModelTransforms t;
  t.act = parse_act_quant("int4");
  t.act.clip = 0.8;
  m.set_transforms(t);
  const Tensor fixed = test::logits_of(m, tok);
  t.act.clip = 1.0;
  t.act.clips.assign(size_t(c.n_layers) * kActPoints, 0.8);  // every point 0.8 = the fixed ratio
  m.set_transforms(t);
  EXPECT_LT(max_abs_diff(test::logits_of(m, tok), fixed), 1e-6);
  for (int p = 0; p < kActPoints; ++p) {  // one point of the last layer changed: the logits move
    ModelTransforms u = t;
    u.act.clips[size_t(c.n_layers - 1) * kActPoints + size_t(p)] = 0.3;
    m.set_transforms(u);
    const Tensor moved = test::logits_of(m, tok);
    EXPECT_GT(max_abs_diff(moved, fixed), 1e-5) << "point " << p;
    // Decoding through the cache reads the same ratios.
    NoGradGuard ng;
    KVCache cache = m.make_cache(10, KVCacheType::F32);
    const Tensor dec = m.forward_cached(tok.view({10}), cache).value();
    EXPECT_LT(max_abs_diff(dec, moved.view(dec.shape())), 1e-4) << "point " << p;
  }
  // Wrong count or range: refused.
  ModelTransforms bad = t;
  bad.act.clips.pop_back();
  EXPECT_THROW(m.set_transforms(bad), Error);
  bad = t;
  bad.act.clips[3] = 1.5;
  EXPECT_THROW(m.set_transforms(bad), Error);
}

TEST(ActClip, SearchOnASmallModelAndCheckpointRecord) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaWeights w = random_weights(c, 11, 0.2);
  w.layers[0].attn_norm.data<float>()[3] = 25.0f;  // an outlier channel: clipping pays off there
  LlamaModel m(c, w);
  std::vector<int32_t> stream;
  for (int i = 0; i < 300; ++i) stream.push_back((i * 17 + 3) % c.vocab_size);
  const Tensor calib = sample_calibration(stream, 3, 16, 0);
  ModelTransforms t;
  t.act = parse_act_quant("int8");  // the model's own quantizer is switched off while the search runs
  m.set_transforms(t);
  const Tensor before = test::logits_of(m, calib);
  ActClipOptions o;
  o.rows = 20;
  const ActClipReport r = search_act_clips(m, calib, parse_act_quant("int4"), o);
  ASSERT_EQ(r.clips.size(), size_t(c.n_layers) * kActPoints);
  EXPECT_EQ(r.rows, 20);
  for (double v : r.clips) EXPECT_NE(std::find(o.grid.begin(), o.grid.end(), v), o.grid.end()) << v;
  EXPECT_LE(r.error_searched, r.error_clip1);
  EXPECT_LT(r.error_searched, 0.95 * r.error_clip1);  // int4 on random activations clips profitably
  EXPECT_LT(max_abs_diff(test::logits_of(m, calib), before), 1e-7);  // the model's transforms are back
  // The ratios in a quantized checkpoint: recorded and reloaded to identical outputs.
  const QuantFormat& f = parse_quant_format("int4g32");
  RtnMethod rtn(f);
  PipelineOptions po;
  po.progress = false;
  run_blockwise(m, calib, rtn, f, po);
  t.act = parse_act_quant("int4");
  t.act.clips = r.clips;
  m.set_transforms(t);
  auto dir = test::temp_dir("act-clip-ckpt");
  save_quantized_model(dir.string(), m, "rtn", f);
  QuantizedCheckpoint q = load_quantized_model(dir.string());
  EXPECT_EQ(q.transforms.act.clips, r.clips);
  auto packed = make_quantized_model(q);
  const Tensor tokens = calib.slice(0, 0, 1).contiguous();
  EXPECT_LT(max_abs_diff(test::logits_of(*packed, tokens), test::logits_of(m, tokens)), 1e-5);
}
