// lowbit: quantize, evaluate and run Llama-family models at very low bit widths.
#include <cstdio>
#include <exception>

#include "lowbit/cli/commands.h"
#include "lowbit/core/error.h"
#include "lowbit/core/progress.h"

int main(int argc, char** argv) {
  CLI::App app{"lowbit: quantize, evaluate and run Llama-family models at 2-4 bits", "lowbit"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "lowbit 0.1.0");
  bool quiet = false;
  app.add_flag("-q,--quiet", quiet, "no progress bars");
  app.parse_complete_callback([&] { lowbit::set_progress_enabled(!quiet); });
  lowbit::cli::register_eval(app);
  lowbit::cli::register_generate(app);
  lowbit::cli::register_tokenize(app);
  lowbit::cli::register_convert(app);
  lowbit::cli::register_quantize(app);
  lowbit::cli::register_train(app);
  lowbit::cli::register_finetune(app);
  lowbit::cli::register_export(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const lowbit::Error& e) {
    std::fprintf(stderr, "lowbit: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lowbit: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
