from migrt.fast import main

main()
