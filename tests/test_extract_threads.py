"""Several harness threads in one worker process: one loaded model, one compilation per shape, and
the same records as one thread alone."""

from __future__ import annotations

import pickle
import threading

from test_forward_failures import ROW_LENGTH, outputs, records, sample

from beam_extract.batching import assemble
from beam_extract.extract import ExtractDoFn

HOOKS = ((0, "resid_post"), (2, "mlp_out"))


def test_threads_share_one_model_and_its_compiled_forwards():
    batches = [assemble([[sample(i, 5 + i)], [sample(i + 10, 16)]], rows, ROW_LENGTH)
               for i, rows in enumerate((2, 4, 2, 4, 2, 4))]
    dofn = ExtractDoFn("tiny-random-qwen2", "float32", "auto", HOOKS, "float32")
    # What a runner does: every thread gets its own deserialized copy of the DoFn.
    copies = [pickle.loads(pickle.dumps(dofn)) for _ in range(6)]
    results, compiled, errors = {}, {}, []
    start = threading.Barrier(len(copies))

    def work(index, copy):
        try:
            copy.setup()
            start.wait()
            produced = list(outputs(copy, *batches))
            results[index] = sorted(r for out in produced if not hasattr(out, "tag") for r in records(out, HOOKS))
            compiled[index] = sum(out.value.compile_seconds > 0 for out in produced if hasattr(out, "tag"))
        except Exception as error:  # reported below: an exception in a thread would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=work, args=item) for item in enumerate(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    model = copies[0]._model
    assert all(copy._model is model for copy in copies)  # loaded once for the process
    # One compilation per batch shape, by whichever thread came first; the others waited for it.
    assert len(model._compiled) == 2 and sum(compiled.values()) == 2
    alone = ExtractDoFn("tiny-random-qwen2", "float32", "auto", HOOKS, "float32")
    alone._model = model
    expected = sorted(r for out in outputs(alone, *batches) if not hasattr(out, "tag") for r in records(out, HOOKS))
    assert len(expected) == 2 * 2 * len(batches)
    assert all(result == expected for result in results.values())  # bit for bit: the same executables
