#!/usr/bin/env python3
"""Oracle for GGUF "llama" (sentencepiece-style) vocabularies.

usage: spm_gguf_oracle.py TOKENIZER.model OUT.gguf ADD_BOS ADD_EOS TEXTS.json

Writes OUT.gguf with gguf-py's own writer: a vocabulary-only GGUF (general.architecture llama,
tokenizer.ggml.model "llama", tokens/scores/token types read from the .model by sentencepiece as
llama.cpp's converter does, bos/eos/unk ids, add_bos_token / add_eos_token = ADD_BOS / ADD_EOS
(0 or 1)), then prints one JSON list: for every text of TEXTS.json (a JSON list of strings)
sentencepiece's own encoding, with BOS first when ADD_BOS and EOS last when ADD_EOS.

Control and unknown pieces written in the text ("<s>", "</s>", "<unk>") are cut out first, as
llama.cpp (parse_special) and Hugging Face tokenizers do, and the text between them is encoded by
sentencepiece piece by piece (each piece with its own dummy prefix). A text that sentencepiece does
not give back unchanged through encode + decode (a model whose normalizer rewrites it, e.g.
removing repeated spaces or NFKC: settings GGUF does not carry) gets null: not compared.
Exits 3 when gguf or sentencepiece is missing (the C++ test then skips).
"""
import json
import sys

try:
    import gguf
    import sentencepiece as spm
except ImportError:
    sys.exit(3)


def main():
    model, out, add_bos, add_eos, texts_path = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5]
    sp = spm.SentencePieceProcessor(model_file=model)
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if sp.bos_id() >= 0:
        w.add_bos_token_id(sp.bos_id())
    if sp.eos_id() >= 0:
        w.add_eos_token_id(sp.eos_id())
    if sp.unk_id() >= 0:
        w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    specials = sorted({sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}, key=len, reverse=True)
    result = []
    for text in json.load(open(texts_path, encoding="utf-8")):
        ids, start, i, ok = [], 0, 0, True
        while i <= len(text):
            hit = next((p for p in specials if p and text.startswith(p, i)), None) if i < len(text) else None
            if hit is None and i < len(text):
                i += 1
                continue
            frag = text[start:i]
            if frag:
                ok = ok and sp.decode(sp.encode(frag)) == frag
                ids += sp.encode(frag)
            if hit is None:
                break
            ids.append(sp.piece_to_id(hit))
            i += len(hit)
            start = i
        if not ok:
            result.append(None)
            continue
        if add_bos:
            ids = [sp.bos_id()] + ids
        if add_eos:
            ids = ids + [sp.eos_id()]
        result.append(ids)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
