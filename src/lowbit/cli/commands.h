// Each `lowbit <command>` lives in its own cli/cmd_<name>.cpp and registers itself here.
// A command's callback throws lowbit::Error on bad input; main() prints it and exits 1.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace lowbit::cli {

void register_eval(CLI::App& app);      // lowbit eval ppl|tasks
void register_generate(CLI::App& app);  // lowbit generate
void register_tokenize(CLI::App& app);  // lowbit tokenize
void register_convert(CLI::App& app);   // lowbit convert
void register_quantize(CLI::App& app);  // lowbit quantize
void register_qat(CLI::App& app);       // lowbit qat
void register_train(CLI::App& app);     // lowbit train
void register_finetune(CLI::App& app);  // lowbit finetune
void register_bench(CLI::App& app);     // lowbit bench
void register_export(CLI::App& app);    // lowbit export
void register_serve(CLI::App& app);     // lowbit serve
void register_run(CLI::App& app);       // lowbit run
void register_comm(CLI::App& app);      // lowbit comm (collectives check and bandwidth)
void register_random_model(CLI::App& app);  // lowbit random-model

// cmd_export.cpp: checks a GGUF output path (ends in .gguf, not a directory), and writes a lowbit
// quantized directory as GGUF (tokenizer: `tokenizer`, else the directory's or its source model's).
void check_gguf_output(const std::string& out);
void export_quantized_dir_to_gguf(const std::string& dir, const std::string& out, const std::string& tokenizer,
                                  bool quiet);

}  // namespace lowbit::cli
