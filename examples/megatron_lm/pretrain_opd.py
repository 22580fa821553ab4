"""OPD through Megatron-LM's ``pretrain()``: run it with your usual Megatron-LM flags plus the OPD group.

    torchrun --nproc_per_node=2 examples/megatron_lm/pretrain_opd.py --opd-student STUDENT_DIR \\
        --pretrained-checkpoint MLM_ROOT --tensor-model-parallel-size 2 --global-batch-size 8 \\
        --micro-batch-size 1 --train-iters 32 --lr 1e-5 --save RUN --load RUN --log-interval 1

``--help`` lists the OPD group; every Megatron-LM ``pretrain`` flag is accepted too (README "OPD in Megatron-LM").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from opdlm_megatron.commands.pretrain_megatron_lm import main  # noqa: E402

if __name__ == "__main__":
    main()
