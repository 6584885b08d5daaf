from fmconvert.cli import main

main()
