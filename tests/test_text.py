"""Text input: the tokenizer kept in the bundle, checked at build, used by the server for BYTES."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from support import TINY, run_cli
from optimize.errors import InputSpecError
from optimize.inputs.specs import TensorSpec
from optimize.bundle.folder import text_encoder
from optimize.inputs.tokenizer import TextEncoder, text_section

LENGTH = 16
TOKENS = [TensorSpec("input_ids", (-1, -1), "int64"), TensorSpec("attention_mask", (-1, -1), "int64")]


def sentences() -> list[str]:
    """Real English: paragraphs of a few standard-library docstrings."""
    import csv
    import json as json_module
    import textwrap
    import zipfile

    text = " ".join(m.__doc__ for m in (json_module, csv, textwrap, zipfile))
    return [s.strip() for s in re.split(r"[.\n]\s*\n?", text) if len(s.split()) >= 3]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A real word-level tokenizer (the ``tokenizers`` library) with 64 tokens, the tiny encoder's vocabulary."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    counts = Counter(w for s in sentences() for w in re.findall(r"\w+", s.lower()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, (w, _) in enumerate(counts.most_common(62))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def encode_padded(path, texts):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(LENGTH)
    tokenizer.enable_padding(length=LENGTH, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return (np.array([e.ids for e in encodings], np.int64), np.array([e.attention_mask for e in encodings], np.int64))


def test_encoder_pads_to_the_longest_text_and_counts_what_it_cuts(tokenizer_file, tmp_path):
    ids, mask = encode_padded(tokenizer_file, sentences()[:20])
    section = text_section(tokenizer_file, TOKENS, {"input_ids": ids, "attention_mask": mask}, tmp_path, 24, "test")
    assert section["max_length"] == 24 and section["calibration_length"] == LENGTH and section["pad_id"] == 0
    assert section["fields"] == {"input_ids": "ids", "attention_mask": "attention_mask"}
    assert (tmp_path / section["tokenizer"]).read_bytes() == tokenizer_file.read_bytes()
    encoder = TextEncoder(tmp_path, section, TOKENS)
    short = sentences()[:5] + [""]
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(tokenizer_file))
    feeds, cut = encoder.encode_counted(short)
    longest = max(len(plain.encode(t).ids) for t in short)
    assert cut == 0 and feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (6, longest) and longest < 24
    for row, text in enumerate(short):  # each row is the tokenizer's own encoding, then pad ids and a zero mask
        want = plain.encode(text).ids
        assert feeds["input_ids"][row, :len(want)].tolist() == want and not feeds["input_ids"][row, len(want):].any()
        assert feeds["attention_mask"][row].sum() == len(want)
    feeds, cut = encoder.encode_counted(["a " * 40, "b c", "a " * 24])
    assert cut == 1 and feeds["input_ids"].shape == (3, 24)


def test_serving_length_comes_from_the_model_files(tokenizer_file, tmp_path):
    import json as json_module
    import shutil

    from optimize.inputs.tokenizer import serving_length
    from tiny_models import tiny_encoder

    model = tiny_encoder()  # 32 position embeddings
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    assert serving_length(folder, model, None, LENGTH) == (32, "the model's position embeddings")
    (folder / "tokenizer_config.json").write_text(json_module.dumps({"model_max_length": 1000000000000}))
    assert serving_length(folder, model, None, LENGTH)[0] == 32  # transformers' "unset" value is ignored
    (folder / "sentence_bert_config.json").write_text(json_module.dumps({"max_seq_length": 24}))
    assert serving_length(folder, model, None, LENGTH) == (24, "sentence_bert_config.json max_seq_length")
    (folder / "sentence_bert_config.json").write_text(json_module.dumps({"max_seq_length": 256}))
    length, source = serving_length(folder, model, None, LENGTH)
    assert length == 32 and "says 256" in source
    assert serving_length(folder, model, 20, LENGTH) == (20, "--max-sequence-length")
    with pytest.raises(InputSpecError, match="beyond the model's 32 position embeddings"):
        serving_length(folder, model, 64, LENGTH)


def test_tokenizer_errors_name_what_is_wrong(tokenizer_file, tmp_path):
    ids = np.zeros((4, LENGTH), np.int64)
    with pytest.raises(InputSpecError, match="not token inputs"):
        text_section(tokenizer_file, [TensorSpec("x", (-1, 3, 16, 16))], {"x": ids}, tmp_path)
    with pytest.raises(InputSpecError, match="2-D integer"):
        text_section(tokenizer_file, [TensorSpec("input_ids", (-1, -1), "float32")], {"input_ids": ids}, tmp_path)
    with pytest.raises(InputSpecError, match="token id 500"):
        text_section(tokenizer_file, TOKENS[:1], {"input_ids": ids + 500}, tmp_path)
    with pytest.raises(InputSpecError, match="no tokenizer.json"):
        text_section(tmp_path / "nowhere", TOKENS[:1], {"input_ids": ids}, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    with pytest.raises(InputSpecError, match="not a readable tokenizer.json"):
        text_section(broken, TOKENS[:1], {"input_ids": ids}, tmp_path)


@pytest.mark.service
def test_server_takes_strings_and_answers_as_the_engine_does(tokenizer_file, tmp_path):
    import torch
    import tritonclient.http as triton

    from optimize.bundle import load_runner, read_manifest
    from support import Server, http
    from tiny_models import tiny_encoder

    torch.save(tiny_encoder().state_dict(), tmp_path / "encoder.pt")
    ids, mask = encode_padded(tokenizer_file, sentences())
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "bundle"
    result = run_cli("build", tmp_path / "encoder.pt", "--arch", f"{TINY}:tiny_encoder", "--calib", tmp_path / "text.npz",
                     "--tokenizer", tokenizer_file, "--target", "ort-fp32", "--name", "words", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.text["tokenizer"] == "tokenizer/tokenizer.json"
    assert manifest.text["max_length"] == 32 and manifest.text["calibration_length"] == LENGTH
    checked = manifest.targets["ort-fp32"].accuracy["held_out_max_length"]
    assert checked["tokens"] == 32 and checked["mean_cosine"] > 0.9999
    assert "texts are served up to 32 tokens (the model's position embeddings)" in result.stderr
    shown = run_cli("inspect", out).stdout
    assert "input   text  [-1, 1]  BYTES" in shown and "tokenizer tokenizer/tokenizer.json" in shown

    with Server(out) as server:
        meta = json.loads(http("GET", server.url + "/v2/models/words")[1])
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
        config = json.loads(http("GET", server.url + "/v2/models/words/config")[1])
        assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}]
        texts = sentences()[:3]
        feeds = text_encoder(out, manifest).encode(texts)
        with load_runner(out, "ort-fp32") as runner:
            want = runner.infer(feeds)["output"]
        client = triton.InferenceServerClient(server.url[len("http://"):])
        for binary in (False, True):
            tensor = triton.InferInput("text", [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1), binary_data=binary)
            got = client.infer("words", [tensor]).as_numpy("output")
            assert np.allclose(got, want, atol=1e-5), binary
        # The token inputs are still taken as they are; text with the wrong type is a clear 400.
        tokens = client.infer("words", [_tensor(triton, "input_ids", feeds), _tensor(triton, "attention_mask", feeds)])
        assert np.allclose(tokens.as_numpy("output"), want, atol=1e-5)
        body = json.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}).encode()
        status, answer, _ = http("POST", server.url + "/v2/models/words/infer", body)
        assert status == 400 and "expects BYTES" in json.loads(answer)["error"]
        body = json.dumps({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}).encode()
        status, answer, _ = http("POST", server.url + "/v2/models/words/infer", body)
        assert status == 400 and "[-1, 1]" in json.loads(answer)["error"]
        # Beyond the serving length (the encoder's 32 positions) a text is cut, and that is said.
        long = " ".join(sentences())
        body = json.dumps({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES",
                                       "data": [long, texts[0]]}]}).encode()
        status, answer, _ = http("POST", server.url + "/v2/models/words/infer", body)
        assert status == 200 and json.loads(answer)["parameters"] == {"text_truncated": 1}
        metrics = http("GET", server.url + "/metrics")[1].decode()
        assert re.search(r'inference_text_truncated_total\{model="words",version="\w+"\} 1\.0', metrics), metrics
        status, answer, _ = http("POST", server.url + "/v2/models/words/infer", infer_text([texts[0]]))
        assert "parameters" not in json.loads(answer)
        # perf_analyzer's load data for a text model: the held-out token ids decoded into strings it sends as BYTES.
        assert run_cli("export", "perf-data", out, tmp_path / "perf.json", "--rows", "4").returncode == 0
        data = json.loads((tmp_path / "perf.json").read_text())["data"]
        assert len(data) == 4 and all(set(d) == {"text"} and d["text"]["shape"] == [1] for d in data)
        sent = [d["text"]["content"][0] for d in data]
        assert all(isinstance(t, str) and len(t.split()) >= 3 for t in sent)
        body = json.dumps({"inputs": [{"name": "text", "shape": [4, 1], "datatype": "BYTES", "data": sent}]}).encode()
        assert http("POST", server.url + "/v2/models/words/infer", body)[0] == 200
        # gRPC takes BYTES too: raw (tritonclient's 4-byte length prefixes) and typed bytes_contents.
        import tritonclient.grpc as triton_grpc

        from optimize.oip import grpc_service_pb2 as pb, grpc_service_pb2_grpc

        grpc_client = triton_grpc.InferenceServerClient(server.grpc_url)
        tensor = triton_grpc.InferInput("text", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        assert np.allclose(grpc_client.infer("words", [tensor]).as_numpy("output"), want, atol=1e-5)
        request = pb.ModelInferRequest(model_name="words")
        request.inputs.add(name="text", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(
            [long.encode(), texts[0].encode()])
        import grpc

        with grpc.insecure_channel(server.grpc_url) as channel:
            typed = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert typed.parameters["text_truncated"].int64_param == 1
        status, answer, _ = http("POST", server.url + "/v2/models/words/infer", infer_text([long, texts[0]]))
        over_http = np.asarray(json.loads(answer)["outputs"][0]["data"], np.float32)
        assert np.allclose(np.frombuffer(typed.raw_output_contents[0], np.float32), over_http, atol=1e-5)


def infer_text(texts):
    return json.dumps({"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES",
                                   "data": list(texts)}]}).encode()


def _tensor(triton, name, feeds):
    tensor = triton.InferInput(name, list(feeds[name].shape), "INT64")
    tensor.set_data_from_numpy(feeds[name])
    return tensor
