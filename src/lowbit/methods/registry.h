// The registry of block methods: `lowbit quantize --method NAME` looks NAME up here.
//
// Each method registers its name, a one-line help, whether it needs calibration data, whether it
// trains LoRA adapters (ApiQ family: default format int2g64, --rank, --lora merge) and a factory
// that builds the BlockMethod from the parsed options (MethodConfig). The CLI fills MethodConfig
// from its flags; a factory reads only its own fields. The built-in methods are registered on the
// first call of method_registry() (an explicit list, no static initialisers that a static library
// link could drop); register_method() adds more (tests, experiments).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/methods/adaround.h"
#include "lowbit/methods/apiq.h"
#include "lowbit/methods/awq.h"
#include "lowbit/methods/cle.h"
#include "lowbit/methods/comq.h"
#include "lowbit/methods/gptq.h"
#include "lowbit/methods/guided.h"
#include "lowbit/methods/norm_tweak.h"
#include "lowbit/methods/pipeline.h"
#include "lowbit/methods/ptq161.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/ptqtp.h"
#include "lowbit/methods/rsq.h"

namespace lowbit {

// Everything a factory may read. Method-specific options keep their methods' defaults unless the
// caller sets them.
struct MethodConfig {
  const QuantFormat* format = nullptr;  // required
  GptqOptions gptq;
  AwqOptions awq;
  bool awq_clip = true;
  bool weighted_round = false;          // rtn: importance-weighted ggml block rounding (awq: awq.weighted_round)
  ApiqOptions apiq;                     // meaningful for methods with trains_adapters only
  const SaliencyMap* saliency = nullptr;  // sapr
  NormTweakOptions norm_tweak;
  std::string base = "gptq";            // norm-tweak: the method that quantizes the block (rtn, gptq, awq)
  RsqOptions rsq;
  GuidedOptions guided;
  ComqOptions comq;
  AdaRoundOptions adaround;
  AdaQuantOptions adaquant;
  Ptq161Options ptq161;
  CleOptions cle;                       // cle.bias_correction: set when calibration data is given
  PtqtpOptions ptqtp;
  QuipOptions quip;                     // quip (GPTQ's options from `gptq`)
};

struct MethodInfo {
  std::string name;
  std::string help;                     // one line
  bool needs_calibration = true;        // false: runs without --calib (RTN, CLE: data-free)
  bool trains_adapters = false;         // ApiQ family
  std::function<std::unique_ptr<BlockMethod>(const MethodConfig&)> make;
  // The format `quantize` uses when --format is not given; empty: int4g128 (int2g64 for the ApiQ
  // family). ptqtp: tp2g128, the only format it writes; ptq161: int4pc (its salient part).
  std::string default_format = "";
};

// All registered methods, in registration order (built-ins first).
const std::vector<MethodInfo>& method_registry();
// Adds a method; throws when the name is taken or empty.
void register_method(MethodInfo info);
// The entry of `name`; throws "unknown --method 'NAME' (registered: a, b, ...)" otherwise.
const MethodInfo& find_method(const std::string& name);
// "rtn, gptq, awq, ..." (for help texts and errors).
std::string method_names();
// One "  name  help" line per method (for --help).
std::string method_help();
// find_method(name).make(config), checking config.format.
std::unique_ptr<BlockMethod> make_method(const std::string& name, const MethodConfig& config);

}  // namespace lowbit
