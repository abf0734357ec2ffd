// libFuzzer target: GGUF reader and the Llama-model layer on top of it. Any input must load or
// throw lowbit::Error.
#include "fuzz_common.h"
#include "lowbit/io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::MemFile f(data, size);
  if (!f.ok()) return 0;
  try {
    auto g = lowbit::GgufFile::open(f.path());
    for (const auto& t : g.tensors()) {
      if (lowbit::ggml_type_traits(t.ggml_type)->dtype) g.load_f32(t.name);
      if (lowbit::quant_format_for_ggml_type(t.ggml_type)) {  // ggml block types: both paths
        g.load_f32(t.name);
        if (t.ne.size() == 2) g.load_quantized(t.name).dequantize();
      }
    }
    lowbit::gguf_tokenizer_vocab(g);
    lowbit::load_gguf(f.path());
  } catch (const lowbit::Error&) {
  }
  return 0;
}
