from adaptune.runner.cli import main

main()
