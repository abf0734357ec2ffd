// libFuzzer target: llama2.c checkpoint loader. Any input must load or throw lowbit::Error.
#include "fuzz_common.h"
#include "lowbit/io/llama2c.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::MemFile f(data, size);
  if (!f.ok()) return 0;
  try {
    lowbit::load_llama2c(f.path());
  } catch (const lowbit::Error&) {
  }
  return 0;
}
