from ncbench.cli import main

main()
