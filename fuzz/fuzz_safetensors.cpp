// libFuzzer target: safetensors reader. Any input must open (and its tensors load) or throw
// lowbit::Error.
#include "fuzz_common.h"
#include "lowbit/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::MemFile f(data, size);
  if (!f.ok()) return 0;
  try {
    auto st = lowbit::SafetensorsFile::open(f.path());
    for (const auto& t : st.tensors()) {
      // Keep allocations bounded: the data is in the file, so sizes are bounded by the input.
      if (t.dtype) st.load_f32(t.name);
    }
  } catch (const lowbit::Error&) {
  }
  return 0;
}
