from slmb.cli import main

main()
