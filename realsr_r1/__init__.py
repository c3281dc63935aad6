"""RealSR-R1 (the project's third seed system): real-world SR by an autoregressive multimodal model (Lumina-mGPT)
that reasons in a vision-language chain of thought, trained by a cold start and VLCoT-GRPO. See README.md here.

    vlcot.py            the chain's token layout, constrained decoding, the rewards, the recorded degradations
    model.py            the model doors (real / tiny / mini), the unmasked Chameleon, the LlamaGen-style VQ
    train_realsr_r1.py  the stage script: `sft` (cold start, Eq.4), `grpo` (VLCoT-GRPO, Eq.1-3, 5), `eval`
    build_mini.py       rebuilds the mini presets in realsr_r1/mini/ from photographs of installed packages
"""
