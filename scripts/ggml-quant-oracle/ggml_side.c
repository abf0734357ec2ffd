// ggml side of scripts/ggml-quant-oracle/run.sh: quantize_row_<t>_ref of argv[2] (f32) into argv[3].
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <math.h>
#include "ggml-quants.h"
#include "ggml-common.h"
// reads n floats from stdin-file argv[2], writes blocks of type argv[1] to argv[3]
int main(int argc, char** argv) {
  const char* t = argv[1];
  FILE* f = fopen(argv[2], "rb"); fseek(f, 0, SEEK_END); long nb = ftell(f); fseek(f, 0, SEEK_SET);
  int64_t n = nb / 4; float* x = malloc(nb); fread(x, 4, n, f); fclose(f);
  void* y = malloc(n * 2); size_t sz = 0;
  if (!strcmp(t, "q2_k")) { quantize_row_q2_K_ref(x, y, n); sz = n / 256 * sizeof(block_q2_K); }
  if (!strcmp(t, "q3_k")) { quantize_row_q3_K_ref(x, y, n); sz = n / 256 * sizeof(block_q3_K); }
  if (!strcmp(t, "q4_k")) { quantize_row_q4_K_ref(x, y, n); sz = n / 256 * sizeof(block_q4_K); }
  if (!strcmp(t, "q5_k")) { quantize_row_q5_K_ref(x, y, n); sz = n / 256 * sizeof(block_q5_K); }
  if (!strcmp(t, "q6_k")) { quantize_row_q6_K_ref(x, y, n); sz = n / 256 * sizeof(block_q6_K); }
  if (!strcmp(t, "iq4_nl")) { quantize_row_iq4_nl_ref(x, y, n); sz = n / 32 * sizeof(block_iq4_nl); }
  if (!strcmp(t, "iq4_xs")) { quantize_row_iq4_xs_ref(x, y, n); sz = n / 256 * sizeof(block_iq4_xs); }
  if (!strcmp(t, "q4_0")) { quantize_row_q4_0_ref(x, y, n); sz = n / 32 * sizeof(block_q4_0); }
  FILE* o = fopen(argv[3], "wb"); fwrite(y, 1, sz, o); fclose(o);
  return 0;
}
