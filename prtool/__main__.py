from prtool.cli.app import main

main()
