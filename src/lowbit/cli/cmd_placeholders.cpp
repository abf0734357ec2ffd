// Commands not built yet register a stub that says so; each moves to its own cmd_<name>.cpp.
#include "lowbit/cli/commands.h"
#include "lowbit/core/error.h"

namespace lowbit::cli {

static void not_yet(CLI::App& app, const char* name, const char* what) {
  auto* sub = app.add_subcommand(name, std::string(what) + " (not implemented yet)");
  sub->allow_extras();
  sub->callback([name] { throw_error("'lowbit ", name, "' is not implemented yet in this build"); });
}

void register_eval(CLI::App& app) { not_yet(app, "eval", "evaluate a model"); }
void register_generate(CLI::App& app) { not_yet(app, "generate", "generate text"); }
void register_tokenize(CLI::App& app) { not_yet(app, "tokenize", "tokenize text"); }
void register_convert(CLI::App& app) { not_yet(app, "convert", "convert checkpoints"); }
void register_quantize(CLI::App& app) { not_yet(app, "quantize", "quantize a model"); }
void register_train(CLI::App& app) { not_yet(app, "train", "train a model"); }

}  // namespace lowbit::cli
