"""The finetune stage: the training loop again, from a trained model (see model_inputs).

For supervised fine-tuning the driver tokenizes the (small) prompt/response file once with the
starting model's tokenizer and stores the rows in the stage's output, where every worker on any
node reads them; continued pretraining reads a preprocess stage's sequences like pretraining.
"""

from __future__ import annotations

import os
import tempfile

from jobs.export import TOKENIZER_FILES
from jobs.sft import encode_examples, load_sft_rows, write_examples
from jobs.storage import open_storage
from jobs.tokenizer import INFO_FILE, adopt_tokenizer
from orchestrator.stages import StageContext, StageOutput
from orchestrator.stages.model_inputs import resolve_model, upload_dir
from orchestrator.stages.training import data_fields, run_training


def run(ctx: StageContext) -> StageOutput:
    spec = ctx.spec
    init_uri, staged = resolve_model(ctx.out, spec.init, ctx.inputs.get("init"), spec.init_step, "init")
    job_fields = {"init_uri": init_uri, "lora": spec.lora}
    if spec.task:
        rows = load_sft_rows(spec.task)
        with tempfile.TemporaryDirectory(prefix="orchestrator-sft-") as tmp:
            tokenizer = os.path.join(tmp, "tokenizer")
            init = open_storage(init_uri)
            for name in TOKENIZER_FILES:
                if init.exists(name):
                    init.download_file(name, os.path.join(tokenizer, name))
            if not os.path.exists(os.path.join(tokenizer, INFO_FILE)):  # a model from elsewhere: read its ids
                adopt_tokenizer(tokenizer, tokenizer + "-adopted")
                tokenizer += "-adopted"
            inputs, labels, counts = encode_examples(rows, tokenizer, spec.task.seq_len)
            if counts["num_without_response"]:
                ctx.console.line(f"  {counts['num_without_response']} of {counts['num_examples']} examples have no "
                                 f"response token left within seq_len {spec.task.seq_len}: they teach nothing")
            write_examples(inputs, labels, os.path.join(tmp, "sft"))
            staged.update(upload_dir(ctx.out, os.path.join(tmp, "sft"), "sft"))
        job_fields["sft_uri"] = ctx.out.url("sft")
    else:
        job_fields.update(data_fields(ctx, spec.data))
    output = run_training(ctx, job_fields)
    output.files.update(staged)
    if spec.task:
        output.metrics.update({f"sft_{k}": v for k, v in counts.items()})
    return output
