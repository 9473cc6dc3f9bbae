"""Loading keeps about one copy of the weights in memory, not two (mmap, one tensor at a time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.parity import tiny_checkpoints as tiny

# Sample anonymous RSS (file-backed mmap pages are page cache, not the process's copy).
PROBE = textwrap.dedent("""
    import sys, threading, time, torch
    from models.llama4 import load_model

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak = [0]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.002)
    base = anon_kb()
    t = threading.Thread(target=sample); t.start()
    model = load_model(sys.argv[1], dtype="float32", tokenizer=False).model
    done.set(); t.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(weights, (peak[0] - base) * 1024)
""")


def test_peak_memory_is_about_one_copy(tmp_path):
    # ~200 MB of fp32 weights: large enough that a second copy would dominate the overhead.
    path = tiny.save_llama(tmp_path / "big", vocab_size=16384, hidden_size=1024, intermediate_size=2048,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                           tie_word_embeddings=False)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                         check=True)
    weights, peak = map(int, out.stdout.split())
    assert weights > 150e6
    assert peak < 1.35 * weights, f"peak {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
