// Matryoshka slicing of packed tensors and models (formulas in matryoshka.h).
#include "lowbit/quant/matryoshka.h"

#include <cmath>
#include <cstdlib>
#include <sstream>

#include "lowbit/core/error.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

bool matryoshka_parent(const QuantFormat& f) {
  return f.kind == QuantKind::IntAsym && f.bits == 8 && f.granularity == ScaleGranularity::PerGroup;
}

bool matryoshka_width_valid(int r) { return r == 2 || r == 3 || r == 4 || r == 8; }

const QuantFormat& matryoshka_slice_format(const QuantFormat& parent, int r, const std::string& flag) {
  if (!matryoshka_width_valid(r))
    throw_error(flag, ": ", r, " is not a Matryoshka width (expected 8, 4, 3 or 2: the int8 codes or their top 4, 3 or 2 bits)");
  if (!matryoshka_parent(parent))
    throw_error(flag, ": the model is stored in ", parent.name,
                ", not a Matryoshka parent format (int8g32, int8g64, int8g128: what qat --method matquant writes)");
  if (r == 8) return parent;
  for (const QuantFormat& f : all_quant_formats())
    if (f.kind == QuantKind::IntAsym && f.bits == r && f.granularity == ScaleGranularity::PerGroup &&
        f.group_size == parent.group_size)
      return f;
  throw_error(flag, ": no int", r, "g", parent.group_size, " format for the ", r, "-bit slice of ", parent.name);
}

QuantizedTensor matryoshka_slice(const QuantizedTensor& q_in, int r) {
  const QuantizedTensor q = q_in.row_layout();
  const QuantFormat& pf = q.fmt();
  const QuantFormat& sf = matryoshka_slice_format(pf, r, "matryoshka_slice");
  q.validate();
  if (r == pf.bits) return q;
  const int c = pf.bits, k = c - r;
  const float mult = float(1 << k);
  const int64_t out = q.out_features(), in = q.in_features(), G = pf.n_groups(in);
  std::vector<uint8_t> codes(size_t(out * in));
  std::vector<GroupParams> params(size_t(out * G));
  for (int64_t row = 0; row < out; ++row) {
    uint8_t* cr = codes.data() + row * in;
    q.unpack_row(row, cr);
    for (int64_t j = 0; j < in; ++j) cr[j] = matryoshka_slice_code(cr[j], c, r);
    for (int64_t g = 0; g < G; ++g) {
      const GroupParams p = q.group_params(row, g);
      // s 2^k and z / 2^k: exact in f16 unless s 2^k overflows (make_quantized_tensor checks the
      // storage round trip and throws then).
      const GroupParams ps{p.scale * mult, p.zero / mult};
      if (!std::isfinite(ps.scale) || ps.scale > 65504.0f)
        throw_error("matryoshka_slice: row ", row, " group ", g, ": scale ", p.scale, " x 2^", k, " does not fit in f16");
      params[size_t(row * G + g)] = ps;
    }
  }
  return make_quantized_tensor(sf, out, in, codes.data(), params.data(), 1.0f);
}

std::vector<int> parse_matryoshka_widths(const std::string& text, const std::string& flag) {
  std::vector<int> w;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || !matryoshka_width_valid(int(v)))
      throw_error(flag, ": '", item, "' is not a Matryoshka width (expected a comma-separated list of 8, 4, 3, 2, e.g. 8,4,2)");
    for (int x : w)
      if (x == int(v)) throw_error(flag, ": width ", v, " is listed twice in '", text, "'");
    w.push_back(int(v));
  }
  if (w.empty()) throw_error(flag, ": no widths given (e.g. 8,4,2)");
  return w;
}

std::vector<double> parse_width_weights(const std::string& text, size_t n_widths, const std::string& flag) {
  if (text.empty()) return std::vector<double>(n_widths, 1.0);
  std::vector<double> w;
  std::stringstream ss(text);
  std::string item;
  bool any = false;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || !std::isfinite(v) || v < 0)
      throw_error(flag, ": '", item, "' is not a finite weight >= 0");
    any = any || v > 0;
    w.push_back(v);
  }
  if (w.size() != n_widths)
    throw_error(flag, ": ", w.size(), " weights for ", n_widths, " widths (one weight per --widths entry)");
  if (!any) throw_error(flag, ": every weight is 0");
  return w;
}

int matryoshka_slice_model(LlamaModel& model, int r, const std::string& what) {
  int n = 0;
  for (int i = 0; i < model.n_layers(); ++i)
    for (auto& [name, slot] : model.block(i).linears()) {
      auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
      if (!ql || !matryoshka_parent(ql->packed().fmt()))
        throw_error(what, ": layer ", i, " ", name, " is ", ql ? ql->packed().fmt().name : (*slot)->kind(),
                    ", not a Matryoshka parent (int8g32/int8g64/int8g128, written by qat --method matquant)");
      if (ql->has_lora()) throw_error(what, ": layer ", i, " ", name, " has LoRA adapters; a Matryoshka slice has none");
      const Tensor bias = ql->bias();
      *slot = std::make_shared<QuantLinear>(matryoshka_slice(ql->quantized(), r), bias, ql->device());
      ++n;
    }
  return n;
}

}  // namespace lowbit
