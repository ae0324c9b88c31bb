from k2cli.main import main

main()
