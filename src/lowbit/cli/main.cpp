// lowbit: quantize, evaluate and run Llama-family models at very low bit widths.
//
// The one error path of every command: user-facing failures (lowbit::Error, CLI11 parse and
// validation errors, filesystem errors, failed writes to stdout, out of memory) print
// "lowbit: error: ..." on stderr and exit with status 1; "lowbit: internal error: ..." with status
// 2 is kept for real bugs. --help and --version exit 0.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <new>
#include <string>

#include "lowbit/cli/commands.h"
#include "lowbit/cli/common.h"
#include "lowbit/cli/dist.h"
#include "lowbit/core/error.h"
#include "lowbit/core/progress.h"

namespace {

int user_error(const std::string& msg) {
  std::fprintf(stderr, "lowbit: error: %s\n", msg.c_str());
  return 1;
}

// CLI11's messages, made to name the problem: an unknown first word is an unknown command.
int parse_error(const CLI::App& app, const CLI::ParseError& e) {
  if (app.get_subcommands().empty()) {
    std::string names;
    for (const CLI::App* s : app.get_subcommands({})) names += (names.empty() ? "" : ", ") + s->get_name();
    const auto rest = app.remaining();
    if (!rest.empty() && !rest.front().empty() && rest.front()[0] != '-')
      return user_error("unknown command '" + rest.front() + "' (commands: " + names + "; see lowbit --help)");
    if (!rest.empty()) return user_error("unknown option '" + rest.front() + "' (see lowbit --help)");
    if (dynamic_cast<const CLI::RequiredError*>(&e) && rest.empty())
      return user_error("no command given (commands: " + names + "; see lowbit --help)");
  }
  std::string msg = e.what();
  if (msg.empty()) msg = e.get_name();
  return user_error(msg + " (see --help)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lowbit: quantize, evaluate and run Llama-family models at 2-4 bits", "lowbit"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "lowbit 0.1.0");
  // Subcommands created below inherit fallthrough: -q/--quiet works before or after the command.
  app.fallthrough();
  bool quiet = false;
  app.add_flag("-q,--quiet", quiet, "no progress bars");
  app.parse_complete_callback([&] { lowbit::set_progress_enabled(!quiet); });
  lowbit::cli::register_eval(app);
  lowbit::cli::register_generate(app);
  lowbit::cli::register_tokenize(app);
  lowbit::cli::register_convert(app);
  lowbit::cli::register_quantize(app);
  lowbit::cli::register_qat(app);
  lowbit::cli::register_train(app);
  lowbit::cli::register_finetune(app);
  lowbit::cli::register_bench(app);
  lowbit::cli::register_export(app);
  lowbit::cli::register_serve(app);
  lowbit::cli::register_run(app);
  lowbit::cli::register_comm(app);
  lowbit::cli::set_command_line(argc, argv);
  lowbit::cli::register_random_model(app);
  try {
    app.parse(argc, argv);
    lowbit::cli::check_stdout();
  } catch (const lowbit::cli::ExitRequest& e) {  // --gpus N: the ranks' exit status
    return e.code;
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return parse_error(app, e);
  } catch (const lowbit::Error& e) {
    return user_error(e.what());
  } catch (const std::filesystem::filesystem_error& e) {
    // A path the user named could not be created, read or written.
    std::string msg = e.path1().empty() ? std::string() : e.path1().string() + ": ";
    msg += e.code().message();
    if (!e.path2().empty()) msg += " (" + e.path2().string() + ")";
    return user_error(msg);
  } catch (const std::bad_alloc&) {
    return user_error("out of memory (try a smaller --batch, --seq-len or model)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lowbit: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
