from ckpt_tools.cli import main

main(prog_name="python -m ckpt_tools")
