// lowbit side of scripts/ggml-quant-oracle/run.sh: lowbit::ggml::quantize_row_<t> of argv[2] (f32) into argv[3].
#include <cstdio>
#include <cstring>
#include <vector>
#include "lowbit/quant/ggml_quants.h"
#include "lowbit/core/format_traits.h"
using namespace lowbit::ggml;
int main(int argc, char** argv) {
  const char* t = argv[1];
  FILE* f = fopen(argv[2], "rb"); fseek(f, 0, SEEK_END); long nb = ftell(f); fseek(f, 0, SEEK_SET);
  int64_t n = nb / 4; std::vector<float> x(n); fread(x.data(), 4, n, f); fclose(f);
  std::vector<uint8_t> y(n * 2); size_t sz = 0;
  if (!strcmp(t, "q2_k")) { quantize_row_q2_k(x.data(), n, y.data()); sz = n / 256 * 84; }
  if (!strcmp(t, "q3_k")) { quantize_row_q3_k(x.data(), n, y.data()); sz = n / 256 * 110; }
  if (!strcmp(t, "q4_k")) { quantize_row_q4_k(x.data(), n, y.data()); sz = n / 256 * 144; }
  if (!strcmp(t, "q5_k")) { quantize_row_q5_k(x.data(), n, y.data()); sz = n / 256 * 176; }
  if (!strcmp(t, "q6_k")) { quantize_row_q6_k(x.data(), n, y.data()); sz = n / 256 * 210; }
  if (!strcmp(t, "iq4_nl")) { quantize_row_iq4_nl(x.data(), n, y.data()); sz = n / 32 * 18; }
  if (!strcmp(t, "iq4_xs")) { quantize_row_iq4_xs(x.data(), n, y.data()); sz = n / 256 * 136; }
  if (!strcmp(t, "q4_0")) { quantize_row_q4_0(x.data(), n, y.data()); sz = n / 32 * 18; }
  FILE* o = fopen(argv[3], "wb"); fwrite(y.data(), 1, sz, o); fclose(o);
}
