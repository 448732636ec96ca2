"""One process of tests/test_train_multihost.py's agreement test: ``python tests/agreement_worker.py PORT INDEX``.

Process 1 asks to stop at step 1 with a longer batch, reports a failure at step 2 in the second run, and in the
third run leaves without a word: process 0 prints what it agreed (JSON lines) and the error it got."""

import json
import os
import sys

import jax

from train.distributed import HostLost, StepAgreement

port, index = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index)
say = (lambda x: print(json.dumps(x), flush=True)) if index == 0 else (lambda x: None)
a = StepAgreement(timeout_s=3)
say(a.agree(0, "go", 8 + index))
say(a.agree(1, "stop" if index else "go", 8 + 8 * index))
b = StepAgreement(timeout_s=3)  # a second train() in the same processes: its own keys
say(b.agree(0, "go", 4))
if index:
    b.fail(1, "DataError: sample 'x' [bad_image]")
else:
    try:
        b.agree(1, "go", 4)
    except HostLost as e:
        say({"error": str(e)})
c = StepAgreement(timeout_s=3)
if index:
    os._exit(0)  # dies without a word
try:
    c.agree(0, "go", 4)
except HostLost as e:
    say({"error": str(e)})
os._exit(0)
