from migrt.front.fast import main

main()
